"""This host's own leases on runs, and the rule that refuses a write to a run
another host leases.

Why host-local (sync/PROTOCOL.md, "Leases and fencing"): a write to a leased
run carries the token of this host's own acquisition of the lease, kept in the
store's sync state (the snapshot's meta table: neither shipped, pulled,
exported nor restored; a copied directory carries it, but under the node id it
was taken by), never the token in the run record, which may be another host's,
pulled or restored. A write to a run whose record names a lease this host does
not hold raises LeaseLostError before anything is written; the server refuses
whatever gets past that (a pause, a host that did not pull yet).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from ..errors import LeaseLostError, WorkflowError
from ..store import Store
from .records import RunRecord

__all__ = [
    "TAKE_OVER",
    "LeaseLike",
    "drop_lease",
    "held_lease",
    "hold_lease",
    "lease_args",
    "lease_refusal",
    "local_lease",
]

#: sync_state name of a run's lease as this host acquired it (host-local: the
#: snapshot's meta table is neither shipped, pulled, exported nor restored; a
#: copied directory carries it, but under the node id it was taken by)
_HELD = "lease/"

TAKE_OVER = ("take the run's lease first (sync.lease.Leases(transport, store=store)"
             ".acquire(run_id, wait_seconds=...) waits for the holder's lease to expire), "
             "then pass it: Workflows.run(..., lease=lease) or Run.set_lease(lease)")


class LeaseLike(Protocol):
    """A lease as sync.lease hands it out (the engine does not import sync)."""

    @property
    def run_id(self) -> str: ...

    @property
    def holder(self) -> str: ...

    @property
    def token(self) -> int: ...


def _held_doc(store: Store, run_id: str) -> dict[str, Any] | None:
    raw = store.sync_state(_HELD + run_id)
    if not raw:
        return None
    doc: dict[str, Any] = json.loads(raw)
    return doc if doc.get("holder") == store.node_id else None


def local_lease(store: Store, run_id: str) -> tuple[int | None, dict[str, Any] | None]:
    """(this host's token, or None; the server's word on a lease it lost, or None)."""
    doc = _held_doc(store, run_id)
    if doc is None:
        return None, None
    if doc.get("token") is not None:
        return int(doc["token"]), None
    return None, doc if doc.get("lost_to") is not None else None


def held_lease(store: Store, run_id: str) -> int | None:
    """The token of this store's own acquisition of ``run_id``'s lease, or None.

    Kept under the node id that acquired it: a copied store, or one that took a
    new node id, holds nothing (the server accepts a leased run's entries from
    the holder's node id alone).
    """
    return local_lease(store, run_id)[0]


def hold_lease(store: Store, run_id: str, token: int) -> None:
    """Record that this store's node acquired ``run_id``'s lease with ``token``.

    Only what an acquisition returned belongs here (sync.lease does it when it
    has the store): a token read from a run record is another host's.
    """
    if isinstance(token, bool) or not isinstance(token, int) or not 0 < token < 1 << 63:
        raise ValueError(f"lease token must be a positive 63-bit integer, got {token!r}")
    store.set_sync_state(_HELD + run_id, json.dumps(
        {"holder": store.node_id, "token": token}).encode())


def drop_lease(store: Store, run_id: str, *, upto_token: int | None = None,
               lost_to: str | None = None, current_token: int = 0) -> bool:
    """Forget this host's lease on ``run_id`` (released, or lost to another host).

    With ``upto_token``, only a lease whose token is at most that one: a lease
    this host took again meanwhile (a larger token) stays. ``lost_to`` and
    ``current_token`` (the server's word on who holds it now) are kept for the
    LeaseLostError of the next write, also when this host held no lease (it
    wrote to the run without one). True if a lease was dropped.
    """
    held = held_lease(store, run_id)
    if held is not None and upto_token is not None and held > upto_token:
        return False
    if held is None and lost_to is None:
        return False
    note = b"" if lost_to is None else json.dumps(
        {"holder": store.node_id, "lost_to": lost_to, "current": current_token}).encode()
    store.set_sync_state(_HELD + run_id, note)
    return held is not None


def lease_args(lease: tuple[str, int] | LeaseLike, run_id: str) -> tuple[str, int]:
    if isinstance(lease, tuple):
        holder, token = lease
        return str(holder), int(token)
    if lease.run_id != run_id:
        raise WorkflowError(f"the lease given is on run {lease.run_id!r}, not on {run_id!r}")
    return lease.holder, int(lease.token)


def lease_refusal(record: RunRecord, store: Store, held: int | None,
                  lost: dict[str, Any] | None) -> LeaseLostError | None:
    """Why a host holding ``held`` (its own acquisition) may not write the run, or None.

    The run's lease as this host knows it: the record's (as its holder last
    wrote it), or the server's word when the replicator was told the run was
    lost (``lost``, kept by drop_lease), whichever is newer. A run with neither
    is unleased as far as this host knows (the server still refuses the write
    if it is leased there). Otherwise the host needs a token of its own: newer
    than that lease's, or any when that lease is its own (tokens of one server
    only grow, so a smaller one means the server's were set back, say by a
    restore from a backup, and it decides whether the token is current).
    """
    node, run_id = store.node_id, record.run_id
    holder, token = record.owner_node, record.lease_token or 0
    if lost is not None and int(lost["current"]) >= token:
        holder, token = str(lost["lost_to"]), int(lost["current"])
    if not token:
        return None
    if held is not None and (held > token or holder == node):
        return None
    if held is not None and held < token:
        why = f"this host's lease (token {held}) was taken over by {holder} (token {token})"
    elif held is not None:
        why = (f"it is leased by {holder} with token {token}, which this host has without "
               "having acquired it")
    elif holder == node:
        why = (f"this host no longer holds its lease (token {token}): it was released, or "
               "lost to another host")
    else:
        why = f"it is leased by {holder} (token {token}) and this host holds no lease on it"
    return LeaseLostError(
        f"run {run_id!r}: nothing was written, {why} (store {store.path}, node {node})",
        run_id=run_id, current_token=token, holder=holder, hint=TAKE_OVER)
