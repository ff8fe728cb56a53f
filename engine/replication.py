"""The one door between the engine and sync: what a replicator needs from a store,
what a store needs from a replicator, and sync's bookkeeping in the store by name
and type.

The engine never imports sync. Sync reaches a store only through
``ReplicationSource`` (the Store is one), and a store reaches its replicator
only through ``Acknowledger`` (durability 'remote'). What sync records in the
store (the acknowledged LSN, the pull cursor, the server's identity, the last
error, the entries it set aside, the WAL retain floor) is read and written
through ``SyncLedger``, which alone knows each field's name and encoding in the
snapshot's ``meta`` table (FORMAT.md, "Snapshot entry"). That table is
host-local: neither shipped, pulled, exported nor restored; it is durable at
the next checkpoint, except the pull cursor's durable form, which moves with
the merged entries in their record.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import error_from_os
from .handoff import INBOX_SEQ, SyncFile, SyncLock, inbox_pages, read_inbox_page
from .health import Health, fresh
from .identity import NodeIdentity
from .ops import CommitResult, VersionedValue
from .snapshot import SnapshotStore
from .storefile import StoreFile

if TYPE_CHECKING:
    from .events import EventBus
    from .feed import WALReader
    from .versions import Sibling

__all__ = [
    "PULL_CURSOR",
    "SYNC_STATE_PREFIX",
    "Acknowledger",
    "LastError",
    "ReplicationSource",
    "SyncLedger",
    "SyncState",
    "UnshippedEntry",
]

#: record-meta name of the pull cursor: set by the merge record that holds what was
#: pulled up to it (FORMAT.md, meta ops), so the two survive a crash together
PULL_CURSOR = "pull_cursor"

#: meta-table names of sync's fields
_ACKED = b"sync/acked_lsn"
#: the cursor moved over pages holding only this node's own entries: not durable
#: with a record (re-reading them after a crash returns nothing)
_SKIPPED_CURSOR = b"sync/pull_cursor"
_SERVER_ID = b"sync/server_id"
_POSITIONS = b"sync/server_positions"
_LAST_ERROR = b"sync/last_error"
_UNSHIPPED = b"sync/unshipped"
_RETAIN_FLOOR = b"retain_floor"
#: the prefix of every name above but the floor (the raw form ``Store.sync_state`` reads)
SYNC_STATE_PREFIX = b"sync/"


@dataclass(frozen=True)
class LastError:
    """The error the sync worker last met (``walsync status`` shows it)."""

    message: str
    at_unix: float
    #: the worker stopped on it (a permanent error), rather than retrying
    stopped: bool


@dataclass(frozen=True)
class UnshippedEntry:
    """An entry sync set aside and never ships (sync/PROTOCOL.md): which, and why."""

    lsn: int
    key: str
    reason: str


@dataclass(frozen=True)
class SyncState:
    """Everything sync recorded in a store, read at once (for status and the UI)."""

    #: every local record up to it was acknowledged by the server ``server_id`` names
    acked_lsn: int
    #: the server position pulls go on from (durable with the merged entries)
    pull_cursor: int
    server_id: str | None
    #: the lowest LSN the WAL keeps for the server (None: sync holds no WAL)
    retain_floor: int | None
    #: the store recorded an acknowledgement or a pull: others may need its tombstones
    synced_before: bool
    last_error: LastError | None
    unshipped: tuple[UnshippedEntry, ...]
    #: the acknowledged LSN of each server synced with before the current one
    server_positions: Mapping[str, int]


@runtime_checkable
class Acknowledger(Protocol):
    """What a store needs from an attached replicator: a commit with durability
    'remote' returns once this returns (it raises when the server cannot
    acknowledge ``lsn`` in time, or the replicator stopped)."""

    def wait_acknowledged(self, lsn: int, timeout_seconds: float) -> None: ...


class ReplicationSource(Protocol):
    """What a replicator needs from a store (``walsync.engine.Store`` is one)."""

    @property
    def path(self) -> str: ...
    @property
    def node_id(self) -> str: ...
    @property
    def identities(self) -> tuple[NodeIdentity, ...]: ...
    @property
    def closed(self) -> bool: ...
    @property
    def applied_lsn(self) -> int: ...
    @property
    def shippable_lsn(self) -> int: ...
    @property
    def wal_end_bytes(self) -> int: ...
    @property
    def events(self) -> EventBus: ...
    @property
    def sync_ledger(self) -> SyncLedger: ...
    @property
    def retain_floor(self) -> int | None: ...
    def set_retain_floor(self, lsn: int | None) -> None: ...
    def wal_reader(self) -> WALReader: ...
    def flush(self) -> None: ...
    def apply_remote(self, items: Sequence[tuple[str, Sibling]], *,
                     pull_cursor: int | None = None) -> CommitResult | None: ...
    def iter_siblings(self, prefix: str = "", *,
                      chunk_keys: int = 1000) -> Iterator[tuple[str, list[Sibling]]]: ...
    def get_versions(self, key: str) -> list[VersionedValue]: ...
    def attach_replicator(self, replicator: Acknowledger) -> None: ...
    def detach_replicator(self, replicator: Acknowledger, because: str | None = None) -> None: ...
    def add_commit_listener(self, listener: Callable[[int], None]) -> None: ...
    def remove_commit_listener(self, listener: Callable[[int], None]) -> None: ...
    # node identity (sync/incarnation.py)
    @property
    def copied_from(self) -> int | None: ...
    def record_directory(self) -> None: ...
    def renew_node_id(self, fork_lsn: int, *, reason: str) -> NodeIdentity: ...
    def incarnation_tokens(self) -> list[str]: ...
    def add_incarnation_token(self, token: str) -> None: ...


class SyncLedger:
    """Sync's fields in a store, each by name and type. A failed write poisons the
    store, as a commit's would: nothing written after it could be trusted."""

    def __init__(self, snapshot: SnapshotStore, store_file: StoreFile, health: Health,
                 root: Path | None = None) -> None:
        self._snapshot = snapshot
        self._store_file = store_file
        self._health = health
        #: ``SYNC`` and ``SYNC.lock`` (engine/handoff.py): once a sync worker synced the
        #: store, its fields live in that file, for every process
        self._root = root
        self._file = SyncFile(root) if root is not None else None
        self.sync_lock = SyncLock(root) if root is not None else None
        self._page_cursors: dict[Path, int] = {}

    # -- where the fields live ---------------------------------------------------

    @property
    def in_file(self) -> bool:
        """Whether the fields live in ``SYNC`` (a sync worker synced the store)."""
        return self._file is not None and self._file.exists()

    def move_to_file(self) -> None:
        """Make ``SYNC`` the fields' home, with their values as they are now (the sync
        worker does, holding ``SYNC.lock``, before it ships or pulls anything)."""
        assert self._file is not None
        assert self.sync_lock is not None
        self.sync_lock.acquire("the sync worker")
        if self._file.exists():
            return
        doc: dict[str, Any] = {_FILE_NAMES[name]: _from_meta(name, self._snapshot.get_meta(name))
                               for name in _FILE_NAMES}
        doc["retain_floor"] = self.retain_floor
        doc["sync_retain"] = self.retain_floor is not None
        doc["incarnations"] = self._store_file.incarnation_tokens()
        self._file.update(**doc)

    def _meta_get(self, name: bytes) -> bytes | None:
        """A field's raw value, in the meta table's encoding, wherever it lives."""
        if self.in_file and name in _FILE_NAMES:
            assert self._file is not None
            return _to_meta(name, self._file.get(_FILE_NAMES[name]))
        return self._snapshot.get_meta(name)

    def _file_value(self, name: str) -> Any:
        assert self._file is not None
        return self._file.get(name)

    def _file_put(self, what: str, **fields: Any) -> None:
        assert self._file is not None
        assert self.sync_lock is not None
        self._health.check_open()
        self.sync_lock.acquire(f"writing sync state {what!r}")
        try:
            self._file.update(**fields)
        except OSError as exc:
            raise error_from_os(exc, f"writing sync state {what!r} to {self._file.path}"
                                ) from exc

    # -- the claim tokens of the node id (sync/incarnation.py) -----------------------

    def incarnation_tokens(self) -> list[str]:
        if self.in_file:
            assert self._file is not None
            tokens = self._file.get("incarnations")
            return [t for t in tokens if type(t) is str] if isinstance(tokens, list) else []
        return self._store_file.incarnation_tokens()

    def add_incarnation_token(self, token: str) -> None:
        if self.in_file:
            tokens = [token, *(t for t in self.incarnation_tokens() if t != token)]
            self._file_put("incarnations", incarnations=tokens[:_INCARNATIONS_KEPT])
        else:
            self._health.check_writable()
            self._store_file.add_incarnation_token(token)

    def forget_incarnation_tokens(self) -> None:
        """A renewal: the tokens claimed the old id (the STORE file drops its own)."""
        if self.in_file:
            self._file_put("incarnations", incarnations=[])

    def state(self) -> SyncState:
        return SyncState(
            acked_lsn=self.acked_lsn, pull_cursor=self.pull_cursor, server_id=self.server_id,
            retain_floor=self.retain_floor, synced_before=self.synced_before,
            last_error=self.last_error, unshipped=tuple(self.unshipped),
            server_positions=self.server_positions,
        )

    # -- the acknowledged LSN and the pull cursor --------------------------------

    @property
    def acked_lsn(self) -> int:
        """The last LSN the server acknowledged (0: none)."""
        return _int(self._meta_get(_ACKED)) or 0

    def set_acked_lsn(self, lsn: int) -> None:
        """Record the server's acknowledgement; the worker got past any error it
        recorded before (`walsync status` shows no stale error), so that goes."""
        if self.in_file:
            # one durable write: the acknowledgement, the floor it lets the writer's
            # checkpoints go up to, no stale error (a writer's 'remote' commit reads it)
            held = self._file_value("sync_retain") is not False
            self._file_put("acked_lsn", acked_lsn=lsn, last_error=None,
                           **({"retain_floor": lsn + 1} if held else {}))
            return
        self._put(_ACKED, lsn.to_bytes(8, "little"), "acked_lsn")
        if self._meta_get(_LAST_ERROR):
            self._put(_LAST_ERROR, b"", "last_error")

    @property
    def pull_cursor(self) -> int:
        """The server position pulls go on from, as the last merged record set it, or
        the last page a sync worker left in the inbox for the writer to merge."""
        pages = inbox_pages(self._root) if self._root is not None else []
        if pages:
            seq, path = pages[-1]
            if seq > int(self._snapshot.get_record_meta(INBOX_SEQ) or 0):
                cursor = self._page_cursors.get(path)
                if cursor is None:
                    try:
                        cursor = read_inbox_page(path).pull_cursor
                    except FileNotFoundError:  # merged meanwhile: the record has it
                        return self.pull_cursor
                    self._page_cursors = {path: cursor}
                return cursor
        return int(self._snapshot.get_record_meta(PULL_CURSOR) or 0)

    @property
    def skipped_pull_cursor(self) -> int | None:
        """The position pulls moved to over this node's own entries alone (None: never)."""
        return _int(self._meta_get(_SKIPPED_CURSOR))

    def set_skipped_pull_cursor(self, position: int) -> None:
        self._put(_SKIPPED_CURSOR, position.to_bytes(8, "little"), "pull_cursor")

    @property
    def synced_before(self) -> bool:
        """Whether the store recorded an acknowledgement or a pull."""
        return (self._meta_get(_ACKED) is not None
                or self._snapshot.get_record_meta(PULL_CURSOR) is not None)

    # -- the server ------------------------------------------------------------

    @property
    def server_id(self) -> str | None:
        """The server the acknowledged LSN was confirmed by (None: not known)."""
        raw = self._meta_get(_SERVER_ID)
        return raw.decode() if raw else None

    def set_server_id(self, server_id: str | None) -> None:
        self._put(_SERVER_ID, b"" if server_id is None else server_id.encode(), "server_id")

    @property
    def server_positions(self) -> dict[str, int]:
        """The acknowledged LSN of each server the store synced with before its current
        one (going back to one ships only what it lacks)."""
        doc = _json(self._meta_get(_POSITIONS))
        if type(doc) is not dict:
            return {}
        return {k: v for k, v in doc.items() if type(k) is str and type(v) is int}

    def set_server_positions(self, positions: Mapping[str, int]) -> None:
        self._put(_POSITIONS, json.dumps(dict(positions)).encode(), "server_positions")

    # -- what went wrong -----------------------------------------------------------

    @property
    def last_error(self) -> LastError | None:
        raw = self._meta_get(_LAST_ERROR)
        if not raw:
            return None
        doc = _json(raw)
        if type(doc) is not dict:
            return LastError(raw.decode(errors="replace"), 0.0, False)
        at = doc.get("at_unix")
        return LastError(str(doc.get("message", "")),
                         float(at) if isinstance(at, int | float) else 0.0,
                         bool(doc.get("stopped", False)))

    def set_last_error(self, error: LastError) -> None:
        doc = {"message": error.message, "at_unix": error.at_unix, "stopped": error.stopped}
        self._put(_LAST_ERROR, json.dumps(doc).encode(), "last_error")

    @property
    def unshipped(self) -> list[UnshippedEntry]:
        doc = _json(self._meta_get(_UNSHIPPED))
        if type(doc) is not list:
            return []
        return [UnshippedEntry(int(d["lsn"]), str(d["key"]), str(d["reason"]))
                for d in doc if type(d) is dict and {"lsn", "key", "reason"} <= d.keys()]

    def set_unshipped(self, entries: Sequence[UnshippedEntry]) -> None:
        doc = [{"lsn": e.lsn, "key": e.key, "reason": e.reason} for e in entries]
        self._put(_UNSHIPPED, json.dumps(doc).encode(), "unshipped")

    # -- what sync pulls (sync/scope.py) ----------------------------------------------

    @property
    def scope(self) -> dict[str, Any] | None:
        """The store's scope document (the STORE file's ``sync_scope``; None: every key)."""
        return self._store_file.sync_scope

    def set_scope(self, doc: dict[str, Any] | None) -> None:
        self._store_file.set_sync_scope(doc)

    # -- the WAL sync holds ----------------------------------------------------------

    @property
    def retain_floor(self) -> int | None:
        """The lowest LSN the WAL must keep (set by sync: first unacknowledged LSN).

        The STORE file says whether a floor holds (``sync_retain``); the snapshot
        holds its value, which moves with every acknowledgement. A snapshot that
        lost the value (rebuilt from a base older than the floor) keeps every
        record (1) until sync sets it again: never a floor too high.
        """
        raw = self._meta_get(_RETAIN_FLOOR)
        floor = int.from_bytes(raw, "little") if raw else None
        held = self._file_value("sync_retain") if self.in_file else self._store_file.sync_retain
        if held is False:
            return None
        if held and floor is None:
            return 1
        return floor

    def set_retain_floor(self, lsn: int | None) -> None:
        """Keep WAL records from ``lsn`` on (None: drop the floor); see Store.set_retain_floor."""
        if lsn is not None and (not isinstance(lsn, int) or isinstance(lsn, bool) or lsn < 1):
            raise ValueError(f"a retain floor is an LSN >= 1 or None, not {lsn!r}")
        if self.in_file:
            if (self._file_value("retain_floor") != lsn
                    or self._file_value("sync_retain") is not (lsn is not None)):
                self._file_put("retain_floor", retain_floor=lsn, sync_retain=lsn is not None)
            return
        self._health.check_writable()
        try:
            if lsn is not None:
                self._store_file.set_sync_retain(True)
            self._snapshot.put_meta(_RETAIN_FLOOR,
                                    b"" if lsn is None else lsn.to_bytes(8, "little"))
            if lsn is None:
                self._store_file.set_sync_retain(False)
        except OSError as exc:
            # a failed write, as a commit's: nothing written after it can be trusted
            raise fresh(self._health.poison(exc, f"setting the WAL retain floor to {lsn}")
                        ) from exc

    def _put(self, name: bytes, value: bytes, field: str) -> None:
        if self.in_file and name in _FILE_NAMES:
            self._file_put(field, **{_FILE_NAMES[name]: _from_meta(name, value)})
            return
        self._health.check_writable()
        try:
            self._snapshot.put_meta(name, value)
        except OSError as exc:
            raise fresh(self._health.poison(exc, f"writing sync state {field!r}")) from exc


#: the fields ``SYNC`` holds, by their meta-table names (and the retain floor)
_FILE_NAMES = {
    _ACKED: "acked_lsn", _SKIPPED_CURSOR: "pull_cursor_skipped", _SERVER_ID: "server_id",
    _POSITIONS: "server_positions", _LAST_ERROR: "last_error", _UNSHIPPED: "unshipped",
    _RETAIN_FLOOR: "retain_floor",
}
_INT_FIELDS = (_ACKED, _SKIPPED_CURSOR, _RETAIN_FLOOR)
#: claim tokens kept (as the STORE file keeps them)
_INCARNATIONS_KEPT = 64


def _from_meta(name: bytes, raw: bytes | None) -> Any:
    """A field's value in ``SYNC`` from its meta-table encoding (empty: none)."""
    if not raw:
        return None
    if name in _INT_FIELDS:
        return int.from_bytes(raw, "little")
    if name == _SERVER_ID:
        return raw.decode()
    return _json(raw)


def _to_meta(name: bytes, value: Any) -> bytes | None:
    """A field's meta-table encoding from its value in ``SYNC``."""
    if value is None:
        return None
    if name in _INT_FIELDS:
        return int(value).to_bytes(8, "little") if type(value) is int and value >= 0 else None
    if name == _SERVER_ID:
        return str(value).encode()
    return json.dumps(value).encode()


def _int(raw: bytes | None) -> int | None:
    return int.from_bytes(raw, "little") if raw else None


def _json(raw: bytes | None) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None
