"""The reserved namespace: the keys walsync's own layers write, which user keys cannot enter.

Every key that starts with ``.walsync/`` belongs to walsync: the workflow
layer's runs (``walsync.engine.workflow.keys``), the LangGraph saver's
checkpoints (``walsync.engine.integrations.langgraph``), and whatever
internal records later versions add. A user's write there is refused at the
Store API boundary (``InvalidKeyError`` naming the key) before anything is
written, so a user key such as ``runs/1`` can never be taken for a run, nor
a run record be overwritten by a user's ``put``. walsync's own layers write
through the internal door (``commit(..., internal=True)``,
``batch(..., internal=True)``). Reads are not restricted: ``get`` and
``scan`` show internal keys like any other (for debugging).

Why a prefix that starts with a dot: it is plain ASCII (the sync server and
PostgREST carry it as text, with no LIKE wildcard in it), the shell leaves it
alone (unlike ``~``), and no key a program made up before would start with it
by accident. Pure: no I/O, imports nothing of walsync.
"""

from __future__ import annotations

__all__ = ["RESERVED_PREFIX", "is_reserved", "reserved_refusal"]

#: the reserved namespace (engine/FORMAT.md, "Keys")
RESERVED_PREFIX = ".walsync/"


def is_reserved(key: str) -> bool:
    """Whether ``key`` lies in the reserved namespace."""
    return key.startswith(RESERVED_PREFIX)


def reserved_refusal(key: str) -> str | None:
    """Why a user may not write ``key`` (None: the key is the user's).

    The message names the key and the way out; the store raises it as an
    InvalidKeyError before anything is written.
    """
    if not key.startswith(RESERVED_PREFIX):
        return None
    return (f"key {key!r:.80} is inside walsync's reserved namespace {RESERVED_PREFIX!r}, "
            "which holds the workflow layer's runs and other internal records; nothing was "
            "written (choose a key that does not start with "
            f"{RESERVED_PREFIX!r}; runs are changed through walsync.engine.workflow)")

