"""The transport protocol: what the replicator needs from a server.

Two implementations pass one contract suite: ``postgres`` (psycopg, direct)
and ``supabase`` (supabase-py, RPC over PostgREST). Both call the same SQL
functions of schema ``walsync_api``; all merge logic runs there.

Errors a transport raises are the sync branch of the error tree:
RemoteUnavailableError is transient (the replicator retries it);
RemoteAuthError, RemoteSchemaError and RemoteRejectedError are permanent
(the replicator stops and reports them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.errors import (
    RemoteAuthError,
    RemoteRejectedError,
    RemoteSchemaError,
    RemoteUnavailableError,
    SyncError,
)

__all__ = ["NodeStatus", "PullPage", "PushAck", "Transport", "error_for_sqlstate"]

#: SQLSTATEs worth retrying: connection trouble, shutdown, overload,
#: serialization failures and deadlocks, statement timeouts, lock timeouts
_TRANSIENT = frozenset({"57P01", "57P02", "57P03", "53300", "53400", "40001", "40P01", "57014",
                        "55P03", "58000"})


def error_for_sqlstate(state: str, message: str) -> SyncError:
    """The sync error for a PostgreSQL SQLSTATE (both transports classify by it)."""
    if state.startswith("08") or state in _TRANSIENT:
        return RemoteUnavailableError(message)
    if state in ("28000", "28P01", "42501"):
        return RemoteAuthError(message)
    if state in ("3F000", "42883", "42P01"):
        return RemoteSchemaError(message)
    return RemoteRejectedError(message)


@dataclass(frozen=True)
class PushAck:
    acked_lsn: int
    inserted: int
    merged: int
    head: int
    #: runs whose entries the server refused for an older fencing token:
    #: ``[{"run_id": ..., "current": token}]``
    fenced: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class PullPage:
    entries: list[dict[str, Any]]
    #: the position to pass to the next pull
    next: int
    head: int


@dataclass(frozen=True)
class NodeStatus:
    node_id: str
    acked_lsn: int
    acked_hlc: int
    pull_cursor: int
    extra: dict[str, Any] = field(default_factory=dict)


class Transport(Protocol):
    name: str

    def push(self, node_id: str, through_lsn: int, entries: list[dict[str, Any]]) -> PushAck:
        """Ship entries; the server acknowledges every LSN up to ``through_lsn``."""

    def pull(self, node_id: str, after: int, limit: int) -> PullPage:
        """Other origins' entries after position ``after`` (whole records)."""

    def node_status(self, node_id: str) -> NodeStatus: ...

    def head(self) -> int: ...

    def call(self, function: str, args: dict[str, Any]) -> Any:
        """Call any ``walsync_api`` function by name (leases, restore, conflicts)."""

    def close(self) -> None: ...


def push_ack(doc: dict[str, Any]) -> PushAck:
    return PushAck(int(doc["acked_lsn"]), int(doc["inserted"]), int(doc["merged"]),
                   int(doc["head"]), list(doc.get("fenced") or []))


def pull_page(doc: dict[str, Any]) -> PullPage:
    return PullPage(list(doc["entries"]), int(doc["next"]), int(doc["head"]))


def node_status(doc: dict[str, Any]) -> NodeStatus:
    known = {"node_id", "acked_lsn", "acked_hlc", "pull_cursor"}
    return NodeStatus(str(doc["node_id"]), int(doc["acked_lsn"]), int(doc["acked_hlc"]),
                      int(doc["pull_cursor"]), {k: v for k, v in doc.items() if k not in known})
