"""Named crash points between the steps of a write, for crash tests.

No-ops unless a test switches one on, either in-process with :func:`enable`
or in a child process through the ``WALSYNC_FAILPOINTS`` environment variable
(``name=action[,name=action]``; actions: ``kill`` sends SIGKILL to the
process, ``raise`` raises :class:`FailpointHit`). The hot path pays one
truth test of a module global when none is on.
"""

from __future__ import annotations

import os
import signal

__all__ = ["ACTIVE", "FailpointHit", "disable", "enable", "hit"]


class FailpointHit(RuntimeError):
    """Raised at a failpoint whose action is ``raise``."""


_actions: dict[str, str] = {}
ACTIVE = False


def enable(name: str, action: str = "raise") -> None:
    global ACTIVE
    if action not in ("raise", "kill"):
        raise ValueError(f"unknown failpoint action {action!r}")
    _actions[name] = action
    ACTIVE = True


def disable(name: str | None = None) -> None:
    global ACTIVE
    if name is None:
        _actions.clear()
    else:
        _actions.pop(name, None)
    ACTIVE = bool(_actions)


def hit(name: str) -> None:
    action = _actions.get(name)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "raise":
        raise FailpointHit(name)


def _load_from_environment() -> None:
    spec = os.environ.get("WALSYNC_FAILPOINTS", "")
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        enable(name, action or "kill")


_load_from_environment()
