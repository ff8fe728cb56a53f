"""The dashboard's replication view: what the store records locally, and what the server says.

The dashboard is not the sync worker: it reads what the worker recorded in
the store (the acknowledged LSN, the pull cursor, the last error) and asks
the server, through the same settings the CLI uses (environment, or a
``WALSYNC_CONFIG`` file), for this node's recovery point, the other nodes'
positions, the head and the leases. Answers are kept for a short while, so
a page polling every two seconds costs the server one round of calls per
interval however many pages are open, and an unreachable server costs each
poll at most a short timeout, never the whole page.

Threads: any; one round of server calls at a time (transports are used by
one thread at a time).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

from walsync.engine import Store
from walsync.engine.errors import SyncConfigError, WalsyncError
from walsync.engine.workflow import keys

from ..config import describe_target, transport_from_env
from ..transport import Transport

__all__ = ["ReplicationView", "known_nodes", "local_state"]

#: seconds a server answer is reused
_SERVER_TTL_SECONDS = 2.0
#: each server call gives up after this long (the page polls again)
_SERVER_TIMEOUT_SECONDS = 5.0


class ReplicationView:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ
        self._lock = threading.Lock()
        self._transport: Transport | None = None
        self._server: dict[str, Any] | None = None
        self._server_at = 0.0

    def close(self) -> None:
        with self._lock:
            if self._transport is not None:
                self._transport.close()
                self._transport = None

    def document(self, local: dict[str, Any], nodes: Iterable[str]) -> dict[str, Any]:
        """The replication page's data around ``local`` (``local_state``, read under the
        store's lock, which this call does not hold while it asks the server)."""
        now = time.time()
        try:
            target = describe_target(self._environ)
            self._ensure_transport()
        except SyncConfigError as exc:
            return {"configured": False, "reason": str(exc), "hint": exc.hint, "local": local,
                    "now_unix": now}
        return {"configured": True, "server": target, "local": local,
                "remote": self.server_state(str(local["node_id"]), nodes),
                "now_unix": now}

    def _ensure_transport(self) -> None:
        """Make the transport once; SyncConfigError when nothing (or nonsense) is set."""
        with self._lock:
            if self._transport is None:
                self._transport = transport_from_env(self._environ,
                                                     timeout_seconds=_SERVER_TIMEOUT_SECONDS)

    def server_state(self, node_id: str, other_nodes: Iterable[str]) -> dict[str, Any]:
        """This node's and the others' positions on the server, the head and the leases."""
        with self._lock:
            now = time.monotonic()
            if self._server is not None and now - self._server_at < _SERVER_TTL_SECONDS:
                return self._server
            assert self._transport is not None
            state = _ask_server(self._transport, node_id, other_nodes)
            self._server, self._server_at = state, time.monotonic()
            return state


def _ask_server(transport: Transport, node_id: str, other_nodes: Iterable[str]) -> dict[str, Any]:
    try:
        head = transport.head()
        leases = transport.leases()
        holders = {lease.holder for lease in leases}
        names = [node_id, *sorted((set(other_nodes) | holders) - {node_id})]
        nodes = []
        for name in names:
            status = transport.node_status(name)
            nodes.append({
                "node_id": status.node_id,
                "this_node": name == node_id,
                "acked_lsn": status.acked_lsn,
                "recovery_point_unix_ms": (status.acked_hlc >> 16) or None,
                "pull_cursor": status.pull_cursor,
                "last_push_at": status.extra.get("last_push_at"),
                "last_pull_at": status.extra.get("last_pull_at"),
                "known_to_server": status.acked_lsn > 0 or status.pull_cursor > 0
                or status.extra.get("last_push_at") is not None,
            })
        return {"error": None, "head": head, "nodes": nodes,
                "leases": [{"run_id": r.run_id, "holder": r.holder, "token": r.token,
                            "expires_at": r.expires_at, "live": r.live} for r in leases],
                "asked_unix": time.time()}
    except WalsyncError as exc:
        return {"error": str(exc), "hint": exc.hint, "head": None, "nodes": [], "leases": [],
                "asked_unix": time.time()}


def local_state(store: Store) -> dict[str, Any]:
    """What the sync worker recorded in the store, and the unreplicated tail it implies."""
    state = store.sync_ledger.state()
    acked = state.acked_lsn
    applied = store.applied_lsn
    last_error = None if state.last_error is None else asdict(state.last_error)
    return {
        "node_id": store.node_id,
        "synced_before": state.synced_before,
        "applied_lsn": applied,
        "acked_lsn": acked,
        "pull_cursor": state.pull_cursor,
        "unreplicated_entries": max(0, applied - acked),
        "oldest_unreplicated_age_seconds": _oldest_unshipped(store, acked, applied),
        "last_error": last_error,
    }


def _oldest_unshipped(store: Store, acked: int, applied: int) -> float | None:
    """Seconds since the oldest local commit the server has not acknowledged: the lag
    as an age, which is what the recovery point costs if the host is lost now."""
    if applied <= acked:
        return None
    try:
        for rec in store.wal_reader().read(acked, applied, 256, 4 << 20):
            if rec.local:
                return max(0.0, time.time() - (rec.hlc >> 16) / 1000)
    except WalsyncError:
        return None
    return None


def known_nodes(store: Store, limit: int = 64) -> set[str]:
    """Nodes this store has heard of: the origins of its runs' last writes."""
    found: set[str] = set()
    for key in store.keys(keys.INDEX, limit=limit):
        version = store.get_version(keys.run(key[len(keys.INDEX):]))
        if version is not None:
            found.add(version.origin)
    return found
