"""The one door between the sync layer and a server: every call and its typed answer.

The replicator, restore, leases, node incarnations, ``walsync status`` and the
dashboard reach a server through ``Transport`` alone, and get its answers as the
types below, checked once by the transport (a malformed answer raises
SyncProtocolError there), so nothing outside a transport module reads a server's
JSON or calls a server function by name.

Three transports pass one contract suite (tests/sync/test_transport_contract.py):
``postgres`` and ``supabase`` call the SQL functions of schema ``walsync_api``
(remote.py holds what they share), ``memory`` (memory.py) is those functions'
reference twin in Python, so replicator logic can be tested without PostgreSQL.
(Over 500 lines: the Protocol, each of its typed answers and the proxy that passes
every call on belong together: one file is the whole door.)

Errors a transport raises are the sync branch of the error tree:
RemoteUnavailableError is transient (the replicator retries it);
RemoteAuthError, RemoteSchemaError and RemoteRejectedError are permanent (the
replicator stops and reports them); SyncProtocolError is an answer that does
not decode.

Threads: a transport is used by one thread at a time (each owner makes its own:
the replicator, a ``Leases``, the dashboard).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from walsync.engine.versions import Sibling

__all__ = ["Claim", "Compaction", "Conflict", "EntryPoint", "FencedRun", "Hello", "LeaseGrant",
           "LeaseInfo", "LeaseRenewal", "LogPage", "LogRetention", "LogRow", "LogWindow",
           "NodeEntry", "NodeInfo", "NodeLabel", "NodeList", "NodeStatus", "PullPage", "PushAck",
           "ScopeGroup", "StateCount", "StatePage", "StateRow", "Transport", "TransportProxy",
           "WireBatch", "WireEntry"]

#: one entry of a record as it travels (sync/PROTOCOL.md "Wire entry")
WireEntry = dict[str, Any]


# -- what a push takes ------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """What a batch is pushed under (``walsync_api.push_claimed``): the incarnation
    token the node id was claimed with (None: an id the store retired, whose LSNs the
    server held before), the LSN below the id's first (``base_lsn``) and the
    acknowledged LSN the batch follows. A batch without one goes to the plain push."""

    incarnation: str | None
    base_lsn: int
    after_lsn: int


class WireBatch(list[WireEntry]):
    """The wire entries of one push, carrying what a transport encoded of them ahead of
    time (``prepare_push``, called off the pushing thread while the previous batch is in
    flight) so that ``push`` only sends it.

    An encoding is kept with the entries it was made from and used only while the
    batch still holds exactly those objects: a slice or copy is a plain list, and a
    batch whose entries were added, removed or replaced is encoded again. (Entries are
    not to be changed in place once encoded.)
    """

    __slots__ = ("_encoded", "claim")

    def __init__(self, entries: Iterable[WireEntry] = (), claim: Claim | None = None) -> None:
        super().__init__(entries)
        self._encoded: dict[str, tuple[tuple[WireEntry, ...], Any]] = {}
        #: the incarnation the batch is pushed under (travels with the batch through
        #: any wrapper of a transport to the one that sends it)
        self.claim = claim

    def keep(self, transport: str, encoded: Any) -> None:
        self._encoded[transport] = (tuple(self), encoded)

    def kept(self, transport: str) -> Any | None:
        """The transport's encoding of exactly these entries, if it made one."""
        got = self._encoded.get(transport)
        if got is None or len(got[0]) != len(self) or not all(map(operator.is_, got[0], self)):
            return None
        return got[1]


# -- the answers ------------------------------------------------------------------------


@dataclass(frozen=True)
class FencedRun:
    """A run whose entries in a push fencing refused, and the lease as the refusal
    found it (its holder: the pusher itself when only its own stale writes were out)."""

    run_id: str
    current: int
    holder: str | None


@dataclass(frozen=True)
class PushAck:
    acked_lsn: int
    inserted: int
    merged: int
    head: int
    #: runs whose entries the server refused (sync/PROTOCOL.md "Leases and fencing")
    fenced: list[FencedRun] = field(default_factory=list)
    #: the server's identity (walsync.server), in the answer to a claimed push
    server_id: str | None = None
    #: why a claimed push was refused, nothing of it stored: "taken" (another
    #: incarnation holds the node id) or "behind" (the server lacks entries before
    #: the batch; ``acked_lsn`` is what it holds)
    refused: str | None = None


@dataclass(frozen=True)
class PullPage:
    """Other origins' entries after a position: ``entries`` as the server sent them
    (with ``pos`` and ``origin``), ``siblings`` the same decoded and checked."""

    entries: list[WireEntry]
    #: the position to pass to the next pull
    next: int
    head: int
    siblings: list[tuple[str, Sibling]] = field(default_factory=list)
    #: the prefixes a scoped pull was read with, as the server resolved them (its
    #: group's included); None: every key
    scope: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ScopeGroup:
    """A named group of key prefixes, kept on the server: stores pulling the group pull
    what it lists now."""

    name: str
    prefixes: tuple[str, ...]


@dataclass(frozen=True)
class LogRetention:
    """The entry log's retention window and what compaction did so far: ``gc_through``
    is the newest position of a tombstone it collected (a pull cursor below it must
    re-bootstrap), ``window_start_hlc`` the oldest HLC whose cut the log holds exactly
    since the last compaction (0: never compacted)."""

    retention_seconds: float
    gc_through: int
    window_start_hlc: int
    compacted_at: str | None
    compacted_entries: int


@dataclass(frozen=True)
class Compaction:
    """One ``compact_log`` call: ``ran`` False when another caller held the lock."""

    ran: bool
    removed_entries: int
    collected_tombstones: int
    gc_through: int
    window_start_hlc: int


@dataclass(frozen=True)
class NodeStatus:
    node_id: str
    acked_lsn: int
    acked_hlc: int
    pull_cursor: int
    #: what else the server says of the node (``last_push_at``, ``last_pull_at``: its
    #: clock's text, or None; absent for a node it never saw)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hello:
    """The server's answer to a claim (or to the question whether one still holds)."""

    server_id: str
    node_id: str
    #: None: claimed (or still held); "taken": another incarnation holds the id;
    #: "ahead": the server holds entries of the id past the caller's acknowledgement
    reason: str | None
    claimed: bool
    #: what the server holds of the id: every LSN up to it
    acked_lsn: int
    acked_hlc: int
    head: int


@dataclass(frozen=True)
class NodeEntry:
    """One entry the server holds of a node: the md5 of its stored bytes (None: a
    tombstone) and its HLC (None: kept among the entries fencing refused)."""

    lsn: int
    key: str
    md5: str | None
    hlc: int | None


@dataclass(frozen=True)
class StateRow:
    """One stored sibling of the merged state, with the hash its value was pushed with."""

    key: str
    sibling: Sibling
    value_hash: str | None


@dataclass(frozen=True)
class StatePage:
    """Every stored sibling of a page of keys (in byte order); ``last_key`` is the
    position to pass next, ``done`` says there is nothing after it."""

    rows: list[StateRow]
    last_key: str | None
    done: bool


@dataclass(frozen=True)
class StateCount:
    keys: int
    bytes: int


@dataclass(frozen=True)
class Conflict:
    """A key whose stored siblings hold ``versions`` distinct values (a tombstone one)."""

    key: str
    versions: int


@dataclass(frozen=True)
class LeaseGrant:
    """The answer to taking a lease: granted (``acquired``) or who holds it until when.
    Times are the server's clock, as its text."""

    acquired: bool
    run_id: str
    holder: str
    token: int
    expires_at: str
    now: str


@dataclass(frozen=True)
class LeaseRenewal:
    """The answer to renewing: when not ``renewed``, the lease as it is now (its holder
    and token; all None when the run has no lease)."""

    renewed: bool
    token: int | None
    expires_at: str | None
    holder: str | None = None


@dataclass(frozen=True)
class LeaseInfo:
    run_id: str
    holder: str
    token: int
    expires_at: str
    #: not yet expired by the server's clock
    live: bool


@dataclass(frozen=True)
class NodeInfo:
    """A node as the server knows it (``walsync nodes``). Times are the server's clock,
    as its text (None: never)."""

    node_id: str
    #: a name a person gave it, or its host's name (None: none given)
    label: str | None
    acked_lsn: int
    acked_hlc: int
    pull_cursor: int
    first_push_at: str | None
    last_push_at: str | None
    last_pull_at: str | None
    claimed_at: str | None
    #: the runs it holds a live lease on, by run id
    leases: list[str]


@dataclass(frozen=True)
class NodeList:
    """Every node the server knows, by node id, with the server's clock and head."""

    nodes: list[NodeInfo]
    head: int
    now: str


@dataclass(frozen=True)
class NodeLabel:
    """The answer to naming a node: its label now; ``known`` False for a node the
    server has no row of (nothing was stored)."""

    node_id: str
    known: bool
    label: str | None


@dataclass(frozen=True)
class LogWindow:
    """The point-in-time window: a cut at or after ``from_hlc`` is restored exactly;
    ``to_hlc`` is the newest entry's HLC (both None while the log is empty)."""

    from_hlc: int | None
    to_hlc: int | None
    entries: int
    head: int


@dataclass(frozen=True)
class LogRow:
    """One entry of the log at its position, decoded and with the hash it was pushed with."""

    pos: int
    key: str
    sibling: Sibling
    value_hash: str | None


@dataclass(frozen=True)
class LogPage:
    """The entries of positions up to ``next`` at or below a cut (``log_page``)."""

    rows: list[LogRow]
    next: int
    head: int


@dataclass(frozen=True)
class EntryPoint:
    """A node's record on the server: its HLC (None: no entry of that LSN) and the
    node's nearest LSNs the server holds below and above it (None: none)."""

    node_id: str
    lsn: int
    hlc: int | None
    before: int | None
    after: int | None


# -- the door ---------------------------------------------------------------------------


class Transport(Protocol):
    """Every call the sync layer makes to a server (sync/PROTOCOL.md "Transports")."""

    name: str

    def prepare_push(self, entries: WireBatch) -> None:
        """Encode a batch for the ``push`` that follows, on any thread (no connection
        is touched); a transport with nothing to encode ahead does nothing."""

    def push(self, node_id: str, through_lsn: int, entries: list[WireEntry]) -> PushAck:
        """Ship entries (under ``entries.claim`` when a WireBatch carries one); the
        server acknowledges every LSN up to ``through_lsn``."""

    def pull(self, node_id: str, after: int, limit: int, *,
             prefixes: Sequence[str] | None = None, group: str | None = None) -> PullPage:
        """Other origins' entries after position ``after`` (whole records); with
        ``prefixes`` or ``group``, only keys under them (``pull_scoped``). Raises
        PullCompactedError when the log no longer holds everything after ``after``."""

    def node_status(self, node_id: str) -> NodeStatus: ...

    def head(self) -> int: ...

    def hello(self, node_id: str, *, tokens: Sequence[str], new_token: str | None,
              acked_lsn: int, base_lsn: int) -> Hello:
        """Claim ``node_id`` with ``new_token`` (None: only ask whether a token of
        ``tokens`` still holds it and nothing is past ``acked_lsn``)."""

    def node_entries(self, node_id: str, after: int, upto: int) -> list[NodeEntry]:
        """What the server holds of ``node_id``'s LSNs in (after, upto], by LSN and key."""

    def state_page(self, prefix: str, after_key: str | None, limit: int) -> StatePage: ...

    def state_count(self, prefix: str) -> StateCount: ...

    def conflicts(self, prefix: str, limit: int) -> list[Conflict]: ...

    def lease_acquire(self, run_id: str, holder: str, ttl_seconds: float) -> LeaseGrant: ...

    def lease_renew(self, run_id: str, holder: str, token: int,
                    ttl_seconds: float) -> LeaseRenewal: ...

    def lease_release(self, run_id: str, holder: str, token: int) -> bool: ...

    def leases(self, holder: str | None = None) -> list[LeaseInfo]:
        """The leases of ``holder`` (None: of everyone), live or expired, by run id."""

    def nodes(self) -> NodeList:
        """Every node the server knows (sync/PROTOCOL.md "Nodes")."""

    def node_label(self, node_id: str, label: str | None, *, replace: bool = True) -> NodeLabel:
        """Name a node (None: no name); ``replace`` False keeps a label already set."""

    def log_window(self) -> LogWindow:
        """The cuts the entry log restores exactly (sync/PROTOCOL.md "Point-in-time restore")."""

    def log_page(self, prefix: str, upto_hlc: int, after: int, limit: int) -> LogPage:
        """Entries under ``prefix`` with an HLC at most ``upto_hlc`` at positions
        (``after``, ``next``], reading at most ``limit`` positions."""

    def entry_point(self, node_id: str, lsn: int) -> EntryPoint:
        """The HLC of ``node_id``'s record ``lsn`` on the server, and its nearest LSNs."""

    def scope_backfill(self, node_id: str, prefix: str, after_pos: int, upto: int,
                       except_prefixes: Sequence[str], after_key: str | None,
                       limit: int) -> StatePage:
        """The stored siblings under ``prefix`` (under none of ``except_prefixes``)
        other origins wrote at positions in ``(after_pos, upto]``, a page of keys after
        ``after_key`` (a widened scope's fill)."""

    def scope_group(self, name: str | None,
                    prefixes: Sequence[str] | None = None) -> list[ScopeGroup]:
        """Set group ``name`` to ``prefixes`` (empty: remove it), then list it (``name``
        None: every group)."""

    def log_retention(self, retention_seconds: float | None = None) -> LogRetention:
        """Set the entry log's retention window (None: leave it), then read it."""

    def compact_log(self) -> Compaction:
        """Compact the entry log beyond its retention window (one caller at a time)."""

    def close(self) -> None: ...


class TransportProxy:
    """A transport that hands every call to another: the base of wrappers that change
    a few calls (fault injection, timing) and must pass the rest on unchanged."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.name = inner.name

    def prepare_push(self, entries: WireBatch) -> None:
        self.inner.prepare_push(entries)

    def push(self, node_id: str, through_lsn: int, entries: list[WireEntry]) -> PushAck:
        return self.inner.push(node_id, through_lsn, entries)

    def pull(self, node_id: str, after: int, limit: int, *,
             prefixes: Sequence[str] | None = None, group: str | None = None) -> PullPage:
        return self.inner.pull(node_id, after, limit, prefixes=prefixes, group=group)

    def node_status(self, node_id: str) -> NodeStatus:
        return self.inner.node_status(node_id)

    def head(self) -> int:
        return self.inner.head()

    def hello(self, node_id: str, *, tokens: Sequence[str], new_token: str | None,
              acked_lsn: int, base_lsn: int) -> Hello:
        return self.inner.hello(node_id, tokens=tokens, new_token=new_token,
                                acked_lsn=acked_lsn, base_lsn=base_lsn)

    def node_entries(self, node_id: str, after: int, upto: int) -> list[NodeEntry]:
        return self.inner.node_entries(node_id, after, upto)

    def state_page(self, prefix: str, after_key: str | None, limit: int) -> StatePage:
        return self.inner.state_page(prefix, after_key, limit)

    def state_count(self, prefix: str) -> StateCount:
        return self.inner.state_count(prefix)

    def conflicts(self, prefix: str, limit: int) -> list[Conflict]:
        return self.inner.conflicts(prefix, limit)

    def lease_acquire(self, run_id: str, holder: str, ttl_seconds: float) -> LeaseGrant:
        return self.inner.lease_acquire(run_id, holder, ttl_seconds)

    def lease_renew(self, run_id: str, holder: str, token: int,
                    ttl_seconds: float) -> LeaseRenewal:
        return self.inner.lease_renew(run_id, holder, token, ttl_seconds)

    def lease_release(self, run_id: str, holder: str, token: int) -> bool:
        return self.inner.lease_release(run_id, holder, token)

    def leases(self, holder: str | None = None) -> list[LeaseInfo]:
        return self.inner.leases(holder)

    def nodes(self) -> NodeList:
        return self.inner.nodes()

    def node_label(self, node_id: str, label: str | None, *, replace: bool = True) -> NodeLabel:
        return self.inner.node_label(node_id, label, replace=replace)

    def log_window(self) -> LogWindow:
        return self.inner.log_window()

    def log_page(self, prefix: str, upto_hlc: int, after: int, limit: int) -> LogPage:
        return self.inner.log_page(prefix, upto_hlc, after, limit)

    def entry_point(self, node_id: str, lsn: int) -> EntryPoint:
        return self.inner.entry_point(node_id, lsn)

    def scope_backfill(self, node_id: str, prefix: str, after_pos: int, upto: int,
                       except_prefixes: Sequence[str], after_key: str | None,
                       limit: int) -> StatePage:
        return self.inner.scope_backfill(node_id, prefix, after_pos, upto, except_prefixes,
                                         after_key, limit)

    def scope_group(self, name: str | None,
                    prefixes: Sequence[str] | None = None) -> list[ScopeGroup]:
        return self.inner.scope_group(name, prefixes)

    def log_retention(self, retention_seconds: float | None = None) -> LogRetention:
        return self.inner.log_retention(retention_seconds)

    def compact_log(self) -> Compaction:
        return self.inner.compact_log()

    def close(self) -> None:
        self.inner.close()
