"""Store: a directory with a WAL, an LMDB snapshot and one writer process.

What is durable when a commit returns: with durability ``local`` (the
default) its WAL frame was fdatasync'ed and it was applied to the snapshot, so
this process reads it back and a crash of the process or the machine keeps
it. With ``none`` it was written and applied but not synced: a process crash
keeps it, a power loss may not.

Threads: a Store may be shared by any number of threads. Commits take a short
lock to check ``expect=``, assign the LSN and version, then join a group
commit of two pipelined stages, each led by one of the waiting threads: the
WAL stage writes every queued frame with one ``writev`` and one
``fdatasync``; the apply stage applies written batches to LMDB, strictly in
LSN order, in one transaction, and wakes their committers. The next batch's
write and fdatasync overlap the previous batch's apply; a commit still
returns only once its record is durable (as asked) and applied. Not
fork-safe: open the store after forking.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cbor2

from . import _fs
from .base import (
    SnapshotRebuild,
    base_outdated,
    clear_open_marker,
    finish_base_swap,
    read_base_lsn,
    rebuild_snapshot,
    untrusted_snapshot_reason,
    write_base,
    write_open_marker,
)
from .errors import (
    CapacityError,
    ConflictError,
    CorruptionError,
    DiskFullError,
    FormatVersionError,
    InvalidKeyError,
    InvalidValueError,
    NoReplicatorError,
    ReadOnlyStoreError,
    StoreClosedError,
    StoreNotFoundError,
    StorePoisonedError,
    StoreStateError,
    ValueTooLargeError,
    WalsyncError,
    error_from_os,
)
from .events import CheckpointEvent, Event, EventBus
from .feed import WALReader
from .identity import NodeIdentity, chain_from_json, chain_to_json, relabel_version
from .keyspace import reserved_refusal
from .layout import StoreLayout
from .lock import WriterLock, writer_is_alive
from .metrics import StoreMetrics, StoreStats
from .options import Durability, StoreOptions
from .record import (
    CODEC_NONE,
    KIND_LOCAL,
    KIND_MERGE,
    MAX_PAYLOAD_BYTES,
    compress_value,
    decode_entry,
    decode_value,
    encode_entry,
    encode_entry_parts,
    encode_payload,
    encode_payload_parts,
    value_problem,
)
from .replay import RecoveryReport, gap_allowed, recover, tail_may_be_torn
from .snapshot import SnapshotStore, key_text
from .versions import (
    HybridClock,
    Sibling,
    Version,
    join_vv,
    merge_sibling,
    visible_siblings,
    winner,
)
from .wal import WALWriter

__all__ = [
    "ANY",
    "CheckpointResult",
    "CommitResult",
    "CompactResult",
    "Delete",
    "Put",
    "ReadView",
    "Store",
    "StoreInfo",
    "VersionedValue",
    "read_store_file",
    "write_store_file",
]

log = logging.getLogger("walsync.store")

#: 2: the STORE file may hold the store's node identities (engine/identity.py), which
#: a reader of store 1 would ignore, shipping records under dots they no longer have
STORE_FORMAT_VERSION = 2
#: the store formats this walsync reads (1: the same file without identities)
_STORE_FORMATS_READ = (1, 2)
_NODE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_RETAIN_FLOOR = b"retain_floor"
#: record-meta name of the identity chain (engine/identity.py), written with the
#: record that relabels a renewal: the WAL, not the STORE file, is its commit point
_IDENTITIES = "identities"
#: STORE file field: the tokens sync claimed the current node id with, newest first
_INCARNATIONS = "incarnations"
#: STORE file field: the store directory's inode number, which a copy of the
#: directory (cp -r, rsync, tar, a restored file backup) does not keep
_DIRECTORY = "directory_inode"
_INCARNATIONS_KEPT = 64
#: STORE file field: true once sync holds the WAL, false once it was detached
_SYNC_RETAIN = "sync_retain"


class _Any:
    """The default of ``expect=``: no check."""

    def __repr__(self) -> str:
        return "ANY"


#: ``expect=ANY`` (the default) checks nothing; ``expect=None`` means the key
#: must not exist; ``expect=<Version>`` means it must still be that version.
ANY: Any = _Any()


@dataclass(frozen=True)
class Put:
    key: str
    value: Any
    expect: Any = ANY
    fence: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    expect: Any = ANY
    fence: int = 0


@dataclass(frozen=True)
class CommitResult:
    lsn: int
    hlc: int
    durability: Durability


@dataclass(frozen=True)
class CheckpointResult:
    lsn: int
    segments_removed: int
    bytes_removed: int


@dataclass(frozen=True)
class CompactResult:
    checkpoint_lsn: int
    snapshot_bytes_before: int
    snapshot_bytes_after: int


@dataclass(frozen=True)
class VersionedValue:
    value: Any
    version: Version


@dataclass(frozen=True)
class StoreInfo:
    path: str
    node_id: str
    applied_lsn: int
    checkpoint_lsn: int
    next_lsn: int
    retain_floor: int | None
    segments: int
    wal_bytes: int
    snapshot_bytes: int
    keys: int
    #: WAL kept only because the server has not acknowledged it (the retain floor)
    wal_bytes_held_for_sync: int = 0


class _Pending:
    __slots__ = (
        "done", "error", "hlc", "kind", "lsn", "notes", "ops", "payload", "sync", "waiter",
        "written",
    )

    def __init__(self, lsn: int, hlc: int, ops: Sequence[Sequence[Any]],
                 payload: bytes | list[bytes], sync: bool, kind: int = KIND_LOCAL):
        self.kind = kind
        self.lsn = lsn
        self.hlc = hlc
        self.ops = ops
        self.payload = payload
        self.sync = sync
        #: the WAL stage is over for this record (written, and synced if asked)
        self.written = False
        self.done = False
        self.error: WalsyncError | None = None
        #: the committing thread sleeps on this (made when it first has to wait),
        #: so that each wake-up goes to the one thread it concerns
        self.waiter: threading.Condition | None = None
        #: events this commit carries (store.events publishes them after its CommitEvent)
        self.notes: tuple[Event, ...] = ()


class Batch:
    """Operations committed together, atomically: all or none survive a crash.

    Use as ``with store.batch() as b: b.put(...); b.delete(...)``; it commits
    when the block exits without an exception (``b.result`` then holds the
    CommitResult) and discards everything otherwise.
    """

    def __init__(self, store: Store, durability: Durability | str | None, fence: int = 0,
                 internal: bool = False) -> None:
        self._store = store
        self._durability = durability
        self._fence = fence
        self._internal = internal
        self.ops: list[Put | Delete] = []
        #: events published with the commit, after its CommitEvent (see Store.commit)
        self.notes: list[Event] = []
        self.result: CommitResult | None = None

    def put(self, key: str, value: Any, *, expect: Any = ANY, fence: int | None = None) -> None:
        self.ops.append(Put(key, value, expect, self._fence if fence is None else fence))

    def delete(self, key: str, *, expect: Any = ANY, fence: int | None = None) -> None:
        self.ops.append(Delete(key, expect, self._fence if fence is None else fence))

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None and self.ops:
            self.result = self._store.commit(self.ops, durability=self._durability,
                                             notes=self.notes, internal=self._internal)


class Store:
    """A walsync store. Open with :meth:`Store.open`; use as a context manager."""

    def __init__(self) -> None:  # use Store.open
        self.path = ""
        self.node_id = ""
        self.options = StoreOptions()
        self.readonly = False
        self.recovery: RecoveryReport | None = None
        self._layout: StoreLayout
        self._snapshot: SnapshotStore
        self._lock: WriterLock | None = None
        self._wal: WALWriter | None = None
        mutex = threading.Lock()
        #: guards the commit pipeline; close and flush wait on _cv, a committer
        #: on its record's own condition, a leader gathering a batch on _gather
        self._mutex = mutex
        self._cv = threading.Condition(mutex)
        #: records waiting for the WAL stage; ``_leading``: a thread holds the WAL
        self._queue: list[_Pending] = []
        self._leading = False
        #: batches written to the WAL, waiting to be applied to LMDB in LSN
        #: order; ``_applying``: a thread is applying
        self._apply_queue: list[list[_Pending]] = []
        self._applying = False
        #: an apply failed: no later record can be applied in this process
        self._apply_error: WalsyncError | None = None
        self._preparing = 0
        #: records queued or further along, whose commit has not returned yet
        self._in_pipeline = 0
        self._gather = threading.Condition(mutex)
        self._overlay: dict[str, tuple[int, list[Sibling]]] = {}
        self._next_lsn = 1
        self._applied_lsn = 0
        self._checkpoint_lsn = 0
        self._clock = HybridClock()
        self._poisoned: WalsyncError | None = None
        self._closed = True
        self._gaps: list[tuple[int, int]] = []
        self._meta: dict[str, Any] = {}
        #: serialises rewrites of the STORE file from several threads (sync's)
        self._store_file_lock = threading.Lock()
        #: every node id this store wrote under (engine/identity.py); the last is node_id
        self._identities: tuple[NodeIdentity, ...] = ()
        self._checkpoint_lock = threading.Lock()
        #: the LSN the snapshot's base copy holds; WAL at or below it may go
        self._base_lsn = 0
        self._bytes_since_checkpoint = 0
        self._checkpoint_wanted = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._replicator: Any = None
        #: why durability 'remote' is off again (the replicator was stopped)
        self._detached_because: str | None = None
        self._listeners: list[Callable[[int], None]] = []
        self._metrics = StoreMetrics()
        #: subscriptions to what happens here (engine/events.py)
        self.events = EventBus()

    # -- opening and closing -------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        readonly: bool = False,
        node_id: str | None = None,
        options: StoreOptions | None = None,
        **overrides: Any,
    ) -> Store:
        """Open (and by default create) a store; a writer replays the WAL first.

        ``overrides`` are StoreOptions fields (``durability="none"``, ...).
        """
        opts = options or StoreOptions()
        if overrides:
            if "durability" in overrides:
                overrides["durability"] = Durability(overrides["durability"])
            opts = replace(opts, **overrides)
        if opts.durability is Durability.REMOTE:
            raise NoReplicatorError("a store cannot default to 'remote' durability before a "
                                    "replicator is attached")
        store = cls()
        store.options = opts
        store.readonly = readonly
        try:
            store._open(Path(path), create=create, node_id=node_id)
        except OSError as exc:
            # a failed file operation (the open left nothing behind): a clear
            # error; opening again once the cause is gone replays as usual
            raise error_from_os(exc, f"opening store {path}") from exc
        return store

    def _open(self, root: Path, *, create: bool, node_id: str | None) -> None:
        self.path = str(root)
        self._layout = layout = StoreLayout(root)
        marked_after_clean_close = False
        if not layout.store_file.exists() and (self.readonly or not create):
            raise StoreNotFoundError(f"no walsync store at {root}")
        if not self.readonly:
            if not root.exists():
                _fs.make_dir(root, parents=True)
            self._lock = WriterLock(layout.lock_file, self.path)
            self._lock.acquire(self.options.lock_timeout_seconds)
        try:
            if not layout.store_file.exists():
                self._initialise(root, node_id)  # under the lock: one creator wins
            self._meta = read_store_file(layout.store_file)
            self.node_id = self._meta["node_id"]
            self._gaps = [(int(a), int(b)) for a, b in self._meta.get("lsn_gaps", [])]
            rebuild = self._check_snapshot_trust()
            # read before this writer's own marker replaces the last one's: the
            # rule verify and repair apply too
            closed_cleanly = not tail_may_be_torn(layout)
            if not self.readonly:
                # before LMDB writes a page (creating its file, replaying): a power
                # loss from here on leaves the marker, and the next boot rebuilds
                # the snapshot instead of trusting pages that were never synced
                write_open_marker(layout)
                marked_after_clean_close = closed_cleanly
            self._snapshot = SnapshotStore(
                layout.snapshot_dir,
                map_size_bytes=self.options.map_size_bytes,
                readonly=self.readonly,
            )
            if not self.readonly:
                self._recover(closed_cleanly)
                if rebuild is not None and self.recovery is not None:
                    self.recovery = replace(self.recovery, snapshot_rebuilt=rebuild)
                if _SYNC_RETAIN not in self._meta and self.retain_floor is not None:
                    self._set_sync_retain(True)  # a floor set before STORE recorded floors
                self._base_lsn = read_base_lsn(layout)
                if (self._base_lsn == 0 and not self._wal_rebuilds_from_empty()) \
                        or base_outdated(layout):
                    # a store whose WAL was trimmed before bases existed (or that a
                    # repair left with holes): without a base now, a power loss
                    # would leave nothing to rebuild the snapshot from; a base of
                    # unsealed values (older format) is replaced by a sealed one
                    self._snapshot.sync()
                    self._base_lsn = write_base(layout, self._snapshot)
                self._bytes_since_checkpoint = self._wal_bytes_above_base()
            self._resolve_identities(node_id)
            self._closed = False
        except BaseException:
            # Close what was opened: a leaked LMDB handle would make every later
            # open (or repair) of this store in this process fail.
            if self._wal is not None:
                self._wal.close()
            snapshot: SnapshotStore | None = getattr(self, "_snapshot", None)
            if snapshot is not None and marked_after_clean_close:
                # A refused open (damage in the log, say) leaves the store closed
                # cleanly, as it found it: its marker would make the next open,
                # verify and repair take damage to acknowledged records for a
                # torn tail. Pages it wrote are synced first; if that fails the
                # marker stays (the snapshot is then rebuilt, never trusted).
                try:
                    snapshot.sync()
                    clear_open_marker(layout)
                except Exception:  # noqa: BLE001 - the original failure is raised
                    log.warning("store %s: the refused open leaves its OPEN marker", root)
            if snapshot is not None:
                snapshot.close()
            if self._lock is not None:
                self._lock.release()
            raise

    def _initialise(self, root: Path, node_id: str | None) -> None:
        """Write the STORE file, which marks a directory as a store; it is written first.

        What a creation killed half-way can leave behind (the lock file, a
        temporary STORE, an empty wal/) does not stop the next attempt;
        anything else means the directory is not ours.
        """
        if node_id is not None and not _NODE_ID_RE.match(node_id):
            raise ValueError(f"node id {node_id!r} must be 1-64 of A-Z a-z 0-9 . _ -")
        layout = self._layout
        leftovers = {p.name for p in root.iterdir()} - {"LOCK", "STORE.tmp"}
        if leftovers - {"wal"} or (layout.wal_dir.is_dir() and any(layout.wal_dir.iterdir())):
            raise StoreNotFoundError(
                f"{root} is not empty and holds no walsync store (no STORE file)",
                hint="choose an empty or new directory",
            )
        meta = {
            "format": STORE_FORMAT_VERSION,
            "node_id": node_id or secrets.token_hex(8),
            "created_unix_ms": int(time.time() * 1000),
            "lsn_gaps": [],
            _DIRECTORY: _directory_identity(root),
        }
        write_store_file(self._layout.store_file, meta)

    def _base_due(self) -> bool:
        """A new base (a compact copy of the snapshot's live pages) is worth it once
        the WAL it lets go outweighs them: writes are at most doubled, the disk the
        WAL takes stays below the live data's, and so does what an open scans."""
        live = self._snapshot.live_bytes()
        with self._cv:
            return self._wal_bytes_above_base() >= live

    def _wal_rebuilds_from_empty(self) -> bool:
        """Whether replaying the whole WAL into an empty snapshot gives the state."""
        if self._applied_lsn == 0:
            return True
        segments = self._layout.list_segments()
        return bool(segments) and segments[0][0] == 1 and not self._gaps

    def _wal_bytes_above_base(self) -> int:
        """WAL bytes a checkpoint would let go: closing makes no base, so a
        store used in many short sessions still checkpoints when this is due."""
        assert self._wal is not None
        sealed = sum(path.stat().st_size for first, path in self._layout.list_segments()
                     if first > self._base_lsn and first != self._wal.segment_first_lsn)
        return sealed + self._wal.segment_size

    def _check_snapshot_trust(self) -> SnapshotRebuild | None:
        """After a machine crash, rebuild the snapshot from its base (engine/base.py)."""
        layout = self._layout
        if self.readonly:
            reason = untrusted_snapshot_reason(layout)
            if reason is not None and _fs.boot_id() is None and writer_is_alive(layout.lock_file):
                # no boot id to compare: a marker under a live writer is its own
                reason = None
            if reason is not None:
                raise StoreStateError(
                    f"store {self.path}: {reason}; its snapshot cannot be read safely",
                    hint="open it for writing once (e.g. `walsync verify` after `walsync "
                    "checkpoint`): the writer rebuilds the snapshot from its last "
                    "checkpoint and the WAL",
                )
            return None
        finish_base_swap(layout)
        reason = untrusted_snapshot_reason(layout)
        if reason is None:
            return None
        rebuild = rebuild_snapshot(layout, reason)
        log.warning("store %s: %s; snapshot moved to %s and rebuilt from the base at LSN %d "
                    "and the WAL", self.path, reason, rebuild.quarantine, rebuild.base_lsn)
        return rebuild

    def _recover(self, closed_cleanly: bool) -> None:
        _fs.make_dir(self._layout.wal_dir)
        report, active, next_lsn = recover(
            self._layout, self._snapshot, self._gaps, int(self._meta.get("min_next_lsn", 1)),
            closed_cleanly=closed_cleanly,
        )
        if report.wal_hole is not None and not gap_allowed(self._gaps, *report.wal_hole):
            self._gaps.append(report.wal_hole)
            self._write_store_file()
        self.recovery = report
        if report.torn_tail is not None:
            log.warning("store %s: torn tail cut on open: %s", self.path, report.torn_tail)
        self._next_lsn = next_lsn
        self._applied_lsn = self._snapshot.applied_lsn()
        self._checkpoint_lsn = 0
        self._clock = HybridClock(self._snapshot.last_hlc())
        self._wal = WALWriter(
            self._layout,
            segment_bytes=self.options.segment_bytes,
            next_lsn=next_lsn,
            active=active,
            on_failure=self._helper_failed,
        )

    def _write_store_file(self) -> None:
        self._meta["lsn_gaps"] = [list(g) for g in self._gaps]
        write_store_file(self._layout.store_file, self._meta)

    def close(self) -> None:
        """Finish pending commits, checkpoint, and release the writer lock."""
        if self._closed:
            return
        with self._cv:
            while self._leading or self._queue or self._applying or self._apply_queue:
                self._cv.wait()
            self._closed = True
        self._checkpoint_wanted.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        try:
            if self._wal is not None and self._poisoned is None:
                self._wal.sync()
                # a small session's close stays cheap (no copy unless due)
                new_base = self._base_due()
                self._wal.close(trim=True)
                self._checkpoint(include_active=True, new_base=new_base)
                clear_open_marker(self._layout)
        except WalsyncError:
            raise
        except Exception as exc:
            # nothing is lost (the WAL holds every record) but this handle
            # cannot finish: say so, as a write failure would
            raise _fresh(self._poison(exc, "close")) from exc
        finally:
            # subscribers get what was published, then their delivery ends
            self.events.close()
            if self._wal is not None:
                self._wal.close()
            self._snapshot.close()
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes --------------------------------------------------------------

    def put(
        self,
        key: str,
        value: Any,
        *,
        expect: Any = ANY,
        durability: Durability | str | None = None,
        fence: int = 0,
    ) -> CommitResult:
        """Store ``value`` under ``key``; durable per ``durability`` when it returns."""
        return self.commit([Put(key, value, expect, fence)], durability=durability)

    def delete(
        self,
        key: str,
        *,
        expect: Any = ANY,
        durability: Durability | str | None = None,
        fence: int = 0,
    ) -> CommitResult:
        """Write a tombstone for ``key`` (a versioned delete, so sync can merge it)."""
        return self.commit([Delete(key, expect, fence)], durability=durability)

    def batch(self, durability: Durability | str | None = None, *, fence: int = 0,
              internal: bool = False) -> Batch:
        """Operations committed together; ``fence`` stamps a lease token on each (sync);
        ``internal`` as for ``commit``."""
        if durability is not None:
            _durability_of(durability)
        _check_fence(fence, "the batch")
        return Batch(self, durability, fence, internal)

    def commit(
        self, ops: Sequence[Put | Delete], *, durability: Durability | str | None = None,
        notes: Sequence[Event] = (), internal: bool = False,
    ) -> CommitResult:
        """Commit operations as one atomic record.

        ``notes`` are events the commit carries (the workflow layer's run and
        step transitions): ``store.events`` publishes them, stamped with the
        commit's LSN, right after its CommitEvent, only if it commits.
        ``internal=True`` is the door of walsync's own layers (the workflow
        layer, the LangGraph saver) into the reserved namespace, whose keys
        every other write is refused (engine/keyspace.py).
        """
        started = time.perf_counter_ns()
        try:
            if not internal:
                ops = _operations(ops)
                for op in ops:
                    key = getattr(op, "key", None)
                    refusal = reserved_refusal(key) if type(key) is str else None
                    if refusal is not None:
                        raise InvalidKeyError(refusal)
            result = self._commit(ops, durability, notes)
        except WalsyncError as exc:
            self._metrics.record_error(exc)
            raise
        self._metrics.commit_ns.observe(time.perf_counter_ns() - started)
        return result

    def _commit(
        self, ops: Sequence[Put | Delete], durability: Durability | str | None,
        notes: Sequence[Event] = (),
    ) -> CommitResult:
        level = self.options.durability if durability is None else _durability_of(durability)
        ops = _operations(ops)
        self._check_writable()
        # read once: a replicator stopped meanwhile is told apart by its own answer
        replicator = self._replicator
        if level is Durability.REMOTE and replicator is None:
            why = f" ({self._detached_because})" if self._detached_because else ""
            raise NoReplicatorError(
                f"durability 'remote' needs a running replicator on store {self.path}{why}; "
                "nothing was written"
            )
        if not ops:
            raise ValueError("a commit needs at least one operation")
        # _preparing counts commits on their way to the queue, which a leader
        # gathering a batch waits for (up to group_wait_seconds)
        with self._cv:
            self._preparing += 1
        try:
            prepared = [self._prepare(op) for op in ops]
        except BaseException:
            with self._cv:
                self._preparing -= 1
                if self._leading:
                    self._gather.notify()
            raise
        with self._cv:
            try:
                self._check_writable()
                item = self._assign(ops, prepared, level is not Durability.NONE)
            finally:
                self._preparing -= 1
                if self._leading:
                    self._gather.notify()
            if notes:
                item.notes = tuple(notes)
            self._submit(item)
        self._finish(item)
        if level is Durability.REMOTE:
            replicator.wait_acknowledged(item.lsn, self.options.remote_timeout_seconds)
        return CommitResult(item.lsn, item.hlc, level)

    def _submit(self, item: _Pending) -> None:
        """Queue a record and wait until it is durable and applied. Holds ``_cv``.

        Group commit in two pipelined stages, each led by one waiting thread
        at a time: the WAL stage writes (and syncs) every queued record in one
        batch; the apply stage applies written batches to LMDB in LSN order.
        While one batch is being applied, the next one's write and fdatasync
        can run. A thread whose record is written keeps leading the WAL stage
        for the records queued meanwhile if another waiting thread can take
        the apply stage (it is woken for it), so the WAL stage does not wait
        for a thread to wake up.

        Every thread in here is running a stage, waiting on its record's
        condition, or about to re-check; whenever a stage is free and has
        work, a thread that will take it is either awake or notified.
        """
        self._queue.append(item)
        self._in_pipeline += 1
        if self._leading:
            self._gather.notify()
        try:
            while not item.done:
                if (not self._leading and self._queue
                        and (not item.written or self._hand_over_apply(item))):
                    self._lead(item)
                elif self._apply_queue and not self._applying:
                    self._wake_wal_leader()
                    self._apply_written()
                else:
                    if item.waiter is None:
                        item.waiter = threading.Condition(self._mutex)
                    item.waiter.wait()
        finally:
            self._in_pipeline -= 1
            if self._leading:
                self._gather.notify()
            self._wake()

    def _hand_over_apply(self, item: _Pending) -> bool:
        """May the thread of ``item`` (written, not yet applied) lead the WAL stage
        for others? Yes if the apply stage needs nobody, or another waiting
        thread with a written record can take it (it is woken). Holds ``_cv``."""
        if self._applying or not self._apply_queue:
            return True
        for batch in self._apply_queue:
            for other in batch:
                if other is not item and other.waiter is not None:
                    other.waiter.notify()
                    return True
        return False

    def _wake_wal_leader(self) -> None:
        if not self._leading and self._queue:
            waiter = self._queue[0].waiter
            if waiter is not None:
                waiter.notify()

    def _wake(self) -> None:
        """After a stage ends: wake the thread that can lead each free stage, and
        close/flush waiting for the pipeline. Holds ``_cv``."""
        if not self._leading and self._queue:
            waiter = self._queue[0].waiter
            if waiter is not None:
                waiter.notify()
        if not self._applying and self._apply_queue:
            waiter = self._apply_queue[0][0].waiter
            if waiter is not None:
                waiter.notify()
        self._cv.notify_all()

    def _done(self, batch: list[_Pending], error: WalsyncError | None) -> None:
        """Finish a batch's commits. Holds ``_cv``: batches applied are finished in
        LSN order, so their events are published (one non-blocking put) in it."""
        if error is None:
            self.events.publish(batch)
        for item in batch:
            item.error = error
            item.done = True
            if item.waiter is not None:
                item.waiter.notify()

    def _finish(self, item: _Pending) -> None:
        if item.error is not None:
            raise _fresh(item.error)
        if self._bytes_since_checkpoint >= self.options.checkpoint_every_bytes:
            self._request_checkpoint()
        for listener in self._listeners:
            try:
                listener(item.lsn)
            except Exception:
                log.exception("commit listener %r failed", listener)

    def apply_remote(
        self, items: Sequence[tuple[str, Sibling]], *, meta: dict[str, Any] | None = None
    ) -> CommitResult | None:
        """Merge versions pulled from other nodes, as one durable record of their own.

        The record goes through the WAL like a local commit (so pulled state
        is replayable) but is marked as a merge, which the replicator never
        ships back. ``meta`` (e.g. the pull cursor) is applied in the same
        record. Returns None when there was nothing to write.
        """
        self._check_writable()
        with self._cv:
            self._check_writable()
            item = self._assign_merge(items, meta)
            if item is None:
                return None
            self._submit(item)
        self._finish(item)
        return CommitResult(item.lsn, item.hlc, Durability.LOCAL)

    def _assign_merge(
        self, items: Sequence[tuple[str, Sibling]], meta: dict[str, Any] | None
    ) -> _Pending | None:
        for _key, sib in items:
            self._clock.observe(sib.version.hlc)
        new: dict[str, list[Sibling]] = {}
        with self._snapshot.read() as txn:
            for key, sib in items:
                current = new.get(key)
                if current is None:
                    current = self._current_siblings(txn, key)
                merged = merge_sibling(current, sib)
                if merged is not None:
                    new[key] = merged
        ops: list[list[Any]] = [[key, encode_entry(sibs)] for key, sibs in new.items()]
        if meta:
            ops.append(["", cbor2.dumps(meta)])
        if not ops:
            return None
        lsn = self._next_lsn
        hlc = self._clock.tick()
        payload = encode_payload(KIND_MERGE, hlc, ops)
        if len(payload) > MAX_PAYLOAD_BYTES:
            # refused here, before the WAL: a frame the writer rejects poisons the store
            raise CapacityError(
                f"a merge of {len(new)} keys encodes to {len(payload)} bytes, above the "
                f"{MAX_PAYLOAD_BYTES} bytes one record may hold; nothing was written",
                hint="merge fewer versions per call",
            )
        self._next_lsn = lsn + 1
        for key, sibs in new.items():
            self._overlay[key] = (lsn, sibs)
        return _Pending(lsn, hlc, ops, payload, True, KIND_MERGE)

    # -- node identity ---------------------------------------------------------

    @property
    def identities(self) -> tuple[NodeIdentity, ...]:
        """Every node id this store wrote under, oldest first, with the LSNs each one
        owns (engine/identity.py); the last is ``node_id``."""
        return self._identities

    def _resolve_identities(self, asked: str | None) -> None:
        """The identity chain: the STORE file's, or the WAL's when a renewal's record
        is durable but the STORE file was not rewritten yet (a crash in between)."""
        root = self.path
        try:
            stored = (chain_from_json(self._meta[_IDENTITIES]) if _IDENTITIES in self._meta
                      else (NodeIdentity(str(self._meta["node_id"]), 1),))
            logged_doc = self._snapshot.get_record_meta(_IDENTITIES)
            logged = chain_from_json(logged_doc) if logged_doc is not None else ()
        except ValueError as exc:
            raise CorruptionError(f"store {root}: its node identities are damaged: {exc}",
                                  hint="`walsync restore` builds a new store from the server"
                                  ) from None
        chain = stored
        if len(logged) > len(stored):
            chain = logged
            log.warning("store %s: node id %s was renewed to %s just before the store closed; "
                        "the STORE file is brought up to date", root, stored[-1].node_id,
                        chain[-1].node_id)
        self._identities = chain
        self.node_id = chain[-1].node_id
        if asked is not None and asked not in {i.node_id for i in chain}:
            raise ValueError(f"store {root} already has node id {self.node_id!r}, not {asked!r}")
        if not self.readonly and chain is not stored:
            self._record_identities(renewed=False)

    @property
    def copied_from(self) -> int | None:
        """The inode number of the directory this store was made in (or last took a
        node id in), when it is not the store's directory now; else None.

        A store whose directory is another one is a copy (cp -r, rsync, tar), or the
        old state of a store put back from a file backup: its original may live on
        and write under the same node id. Sync takes a fresh id for it before it
        ships anything (sync/incarnation.py). Moving a directory within its file
        system keeps the inode; to another one, it counts as a copy (a fresh id, no
        harm). Copies that keep inodes (a cloned disk, a VM image) are the sync
        server's to catch. A store made before directories were recorded names none.
        """
        recorded = self._meta.get(_DIRECTORY)
        if recorded is None:
            return None
        here = _directory_identity(Path(self.path))
        return None if here is None or here == recorded else int(recorded)

    def record_directory(self) -> None:
        """Take the store's directory as its own (a store made before directories were
        recorded; ``renew_node_id`` does it too)."""
        self._check_writable()
        if self._meta.get(_DIRECTORY) is None:
            with self._store_file_lock:
                self._meta[_DIRECTORY] = _directory_identity(Path(self.path))
                write_store_file(self._layout.store_file, self._meta)

    def _record_identities(self, *, renewed: bool) -> None:
        """The STORE file after a renewal (``renewed``: this process made it, in this
        directory) or after one found in the WAL (rolled forward on open)."""
        with self._store_file_lock:
            self._meta["node_id"] = self.node_id
            self._meta[_IDENTITIES] = chain_to_json(self._identities)
            self._meta[_INCARNATIONS] = []  # the tokens claimed the old id
            if renewed:
                self._meta[_DIRECTORY] = _directory_identity(Path(self.path))
            write_store_file(self._layout.store_file, self._meta)

    def renew_node_id(self, fork_lsn: int, *, reason: str) -> NodeIdentity:
        """Take a fresh node id, owning every LSN above ``fork_lsn``; returns it.

        For a store that finds it shares its node id with another (a copy, a restore
        over an old directory): from now on nothing of it is written under the old id
        (SPEC 4.5). Its own versions written under the old id above ``fork_lsn`` (those
        no server confirmed as the original's) are relabelled to the new id with the
        same LSNs, in one durable merge record (never shipped) that also carries the
        new identity chain; the STORE file follows. Records still in the WAL below
        that record are shipped the same way (``engine.identity.translate_vv``).
        ``fork_lsn`` is the last LSN the server holds as this store wrote it.

        Scans the whole snapshot while commits wait: a rare event. Leases taken under
        the old id are not this store's any more (their holder is the old id).
        """
        self._check_writable()
        current = self._identities[-1]
        if type(fork_lsn) is not int or not current.base_lsn <= fork_lsn:
            raise ValueError(f"fork LSN {fork_lsn!r} of store {self.path} is below the first "
                             f"LSN node id {current.node_id} owns ({current.start_lsn})")
        with self._cv:
            self._check_writable()
            item, ident = self._assign_renewal(fork_lsn, reason)
            self._submit(item)
        self._finish(item)
        self._record_identities(renewed=True)
        log.warning("store %s: took node id %s (was %s) for LSNs after %d: %s", self.path,
                    ident.node_id, current.node_id, fork_lsn, reason)
        return ident

    def _assign_renewal(self, fork_lsn: int, reason: str) -> tuple[_Pending, NodeIdentity]:
        """The relabelling record of a renewal, and the switch to the new id. Holds
        ``_cv``: commits assigned before it wrote under the old id (their versions are
        in the overlay, relabelled here too), those after it under the new one."""
        old = self.node_id
        lsn = self._next_lsn
        first = self._identities[0].node_id
        ident = NodeIdentity(f"{first[:47]}.{secrets.token_hex(8)}", fork_lsn + 1, lsn, reason)
        chain = (*self._identities, ident)
        ops: list[list[Any]] = []
        with self._snapshot.read() as txn:
            keys = [k.decode() for k, _ in self._snapshot.iter_range(txn, b"", None, False)]
            for key in sorted(set(keys) | set(self._overlay)):
                sibs = self._current_siblings(txn, key)
                relabelled = [Sibling(relabel_version(s.version, old, ident), s.codec, s.data)
                              for s in sibs]
                if any(a.version is not b.version for a, b in zip(sibs, relabelled,
                                                                  strict=True)):
                    relabelled.sort(key=lambda s: s.version.order_key)
                    ops.append([key, encode_entry(relabelled)])
                    self._overlay[key] = (lsn, relabelled)
        ops.append(["", cbor2.dumps({_IDENTITIES: chain_to_json(chain)})])
        hlc = self._clock.tick()
        payload = encode_payload(KIND_MERGE, hlc, ops)
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise CapacityError(
                f"renewing the node id of {self.path} relabels {len(ops) - 1} keys, "
                f"{len(payload)} bytes, above the {MAX_PAYLOAD_BYTES} bytes one record may hold",
                hint="ship the store's backlog under its old id first (`walsync sync --once`)")
        self._next_lsn = lsn + 1
        self._identities = chain
        self.node_id = ident.node_id
        return _Pending(lsn, hlc, ops, payload, True, KIND_MERGE), ident

    def incarnation_tokens(self) -> list[str]:
        """The tokens sync claimed the current node id with on its servers, newest
        first (sync/incarnation.py): a server gives the id to the store that shows
        the token it holds, and to no copy made before the claim."""
        tokens = self._meta.get(_INCARNATIONS, [])
        return [t for t in tokens if type(t) is str] if isinstance(tokens, list) else []

    def add_incarnation_token(self, token: str) -> None:
        """Remember a token before a server is told it: in the STORE file, fsynced
        (a claim the store forgot would make it renew its id for nothing)."""
        self._check_writable()
        with self._store_file_lock:
            tokens = [token, *(t for t in self.incarnation_tokens() if t != token)]
            self._meta[_INCARNATIONS] = tokens[:_INCARNATIONS_KEPT]
            write_store_file(self._layout.store_file, self._meta)

    # -- hooks for the sync layer ---------------------------------------------

    def add_commit_listener(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(lsn)`` in the committing thread after each commit; it must not block.

        The replicator's wake-up: immediate, and no queue can lose it. Hooks
        that may be slow or fail subscribe to ``store.events`` instead.
        """
        self._listeners.append(listener)

    def remove_commit_listener(self, listener: Callable[[int], None]) -> None:
        self._listeners.remove(listener)

    def attach_replicator(self, replicator: Any) -> None:
        """Enable durability 'remote': ``replicator.wait_acknowledged(lsn, timeout)``."""
        self._replicator = replicator

    def detach_replicator(self, replicator: Any, because: str | None = None) -> None:
        """Disable durability 'remote' again; ``because`` is said to its next caller."""
        if self._replicator is replicator:
            self._replicator = None
            self._detached_because = because

    @property
    def shippable_lsn(self) -> int:
        """The highest LSN both durable in the WAL and applied: safe to ship."""
        wal = self._wal
        return 0 if wal is None else min(wal.synced_lsn, self._applied_lsn)

    def flush(self) -> None:
        """Make every written record durable (fdatasync), e.g. after 'none' commits."""
        self._check_writable()
        wal = self._wal
        assert wal is not None
        with self._cv:
            while self._leading:
                self._cv.wait()
            self._leading = True
        try:
            unsynced = wal.synced_lsn < wal.next_lsn - 1
            wal.sync()
            if unsynced:
                self._metrics.record_sync()
        except BaseException as exc:
            raise _fresh(self._poison(exc, "WAL flush")) from exc
        finally:
            with self._cv:
                self._leading = False
                self._wake()

    def wal_reader(self) -> WALReader:
        return WALReader(self._layout)

    def record_meta(self, name: str) -> Any:
        """A value set by a record's meta (e.g. sync's pull cursor); None if never set."""
        return self._snapshot.get_record_meta(name)

    def sync_state(self, name: str) -> bytes | None:
        """Sync's bookkeeping in the snapshot's meta table (synced at checkpoints)."""
        return self._snapshot.get_meta(b"sync/" + name.encode())

    def set_sync_state(self, name: str, value: bytes) -> None:
        self._check_writable()
        try:
            self._snapshot.put_meta(b"sync/" + name.encode(), value)
        except OSError as exc:
            raise _fresh(self._poison(exc, f"writing sync state {name!r}")) from exc

    def _check_writable(self) -> None:
        if self._closed:
            raise StoreClosedError(f"store {self.path} is closed")
        if self.readonly:
            raise ReadOnlyStoreError(f"store {self.path} was opened read-only")
        if self._poisoned is not None:
            raise self._refusal(self._poisoned)

    def _refusal(self, poisoned: WalsyncError) -> WalsyncError:
        """The error a write meets once the store is poisoned: of the same kind as
        the failure (disk full stays DiskFullError), caused by it (and so by its
        OSError), wherever it happened (a helper thread's failure shows here)."""
        kind = type(poisoned) if isinstance(poisoned, StorePoisonedError) else StorePoisonedError
        error = kind(f"store {self.path} refuses writes since an earlier failure: {poisoned}")
        error.__cause__ = poisoned
        return error

    def _prepare(self, op: Put | Delete) -> tuple[int, bytes | None]:
        """Check every argument that reaches the disk and encode the value, before
        anything is written: a key, fence or value accepted here and unreadable
        later would fail every read, write and sync of that key for good."""
        if type(op) is not Put and type(op) is not Delete:
            raise TypeError(f"a commit takes Put and Delete operations, not "
                            f"{type(op).__name__} ({op!r:.60})")
        key = op.key
        _check_key(key, self.options.max_key_bytes)
        _check_fence(op.fence, f"key {key!r}")
        expect = op.expect
        if expect is not ANY and expect is not None and not isinstance(expect, Version):
            raise TypeError(f"expect= for key {key!r} takes a Version, None or ANY, not "
                            f"{type(expect).__name__} ({expect!r:.60})")
        if isinstance(op, Delete):
            return CODEC_NONE, None
        value = op.value
        problem = value_problem(value, self.options.max_value_bytes)
        if problem is not None:
            raise InvalidValueError(
                f"value for key {key!r} cannot be stored: {problem}; nothing was written"
            )
        try:
            encoded = cbor2.dumps(value)
        except (cbor2.CBOREncodeError, TypeError, ValueError, RecursionError) as exc:
            problem = value_problem(value, self.options.max_value_bytes, thorough=True)
            raise InvalidValueError(
                f"value for key {key!r} cannot be encoded: {problem or exc}; nothing was written"
            ) from None
        if len(encoded) > self.options.max_value_bytes:
            raise ValueTooLargeError(key, len(encoded), self.options.max_value_bytes)
        if len(encoded) > self.options.compress_above_bytes:
            return compress_value(encoded, self.options.compress_level)
        return CODEC_NONE, encoded

    def _assign(
        self,
        ops: Sequence[Put | Delete],
        prepared: list[tuple[int, bytes | None]],
        sync: bool,
    ) -> _Pending:
        """Check expectations, give the record its LSN and versions. Holds ``_cv``."""
        lsn = self._next_lsn
        hlc = self._clock.tick()
        node = self.node_id
        # a large value stays one buffer, shared by the entry and the payload
        # (given in parts) until the apply stage joins the entry for LMDB
        wire_ops: list[tuple[str, bytes | list[bytes]]] = []
        new: dict[str, list[Sibling]] = {}
        with self._snapshot.read() as txn:
            for op, (codec, data) in zip(ops, prepared, strict=True):
                key = op.key
                current = new.get(key)
                if current is None:
                    current = self._current_siblings(txn, key)
                if op.expect is not ANY:
                    _check_expect(key, op.expect, current)
                vv = join_vv(s.version.vv for s in current)
                vv[node] = lsn
                sib = Sibling(Version(node, lsn, hlc, vv, op.fence, data is None), codec, data)
                new[key] = [sib]
                wire_ops.append((key, encode_entry_parts([sib])))
        payload = encode_payload_parts(KIND_LOCAL, hlc, wire_ops)
        size = len(payload) if isinstance(payload, bytes) else sum(len(p) for p in payload)
        if size > MAX_PAYLOAD_BYTES:
            raise CapacityError(
                f"a commit of {len(ops)} operations encodes to {size} bytes, above the "
                f"{MAX_PAYLOAD_BYTES} bytes one record may hold; nothing was written",
                hint="split the batch into several commits",
            )
        self._next_lsn = lsn + 1
        for key, sibs in new.items():
            self._overlay[key] = (lsn, sibs)
        return _Pending(lsn, hlc, wire_ops, payload, sync)

    def _current_siblings(self, txn: Any, key: str) -> list[Sibling]:
        pending = self._overlay.get(key)
        if pending is not None:
            return pending[1]
        raw_key = key.encode()
        raw = self._snapshot.entry_in(txn, raw_key)
        return _siblings_of(self._snapshot, raw_key, raw) if raw is not None else []

    def _lead(self, mine: _Pending) -> None:
        """The WAL stage: write (and sync) every queued record as one batch, then
        queue it for the apply stage. Entered and left holding ``_cv``."""
        self._leading = True
        try:
            wait = self.options.group_wait_seconds
            if wait > 0 and self._others_committing(mine):
                # Other threads are committing right now (preparing a record,
                # or with an earlier one still being applied, after which they
                # often commit again): let them join this batch.
                deadline = time.monotonic() + wait
                while self._others_committing(mine):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._gather.wait(left)
            batch = self._queue
            self._queue = []
            error: WalsyncError | None = None
            if self._poisoned is not None:
                # A group commit failed while these records waited: writing them
                # now would put them after a hole in the log, or after a failed
                # fsync as if nothing had happened.
                error = self._refusal(self._poisoned)
            else:
                # A large batch next in line to apply is applied alongside its
                # WAL write (see _write_and_apply): this thread takes the
                # apply stage too.
                ahead = (
                    not self._applying and not self._apply_queue
                    and self._apply_error is None
                    and sum(_payload_bytes(p.payload) for p in batch) >= _APPLY_AHEAD_BYTES
                )
                if ahead:
                    self._applying = True
                apply_failed = False
                self._cv.release()
                try:
                    if ahead:
                        error, apply_failed = self._write_and_apply(batch)
                    else:
                        error = self._write_wal(batch)
                finally:
                    self._cv.acquire()
                if ahead:
                    self._applying = False
                    for item in batch:
                        item.written = True
                    if error is None:
                        self._applied(batch[-1].lsn)
                    elif apply_failed:
                        self._apply_error = error
                    self._done(batch, error)
                    return
            for item in batch:
                item.written = True
            if error is None:
                self._apply_queue.append(batch)
            else:
                self._done(batch, error)
        finally:
            self._leading = False
            self._cv.notify_all()

    def _others_committing(self, mine: _Pending) -> bool:
        """Whether commits other than the queued ones and the leader's own are under way."""
        if self._preparing > 0:
            return True
        return self._in_pipeline - len(self._queue) - mine.written > 0

    def _apply_written(self) -> None:
        """The apply stage: apply every written batch, in LSN order, in one LMDB
        transaction, and finish their commits. Entered and left holding ``_cv``."""
        self._applying = True
        try:
            batches = self._apply_queue
            self._apply_queue = []
            error = self._apply_error
            if error is None:
                self._cv.release()
                try:
                    error = self._apply_batches(batches)
                finally:
                    self._cv.acquire()
                if error is None:
                    self._applied(batches[-1][-1].lsn)
                else:
                    self._apply_error = error
            for batch in batches:
                self._done(batch, error)
        finally:
            self._applying = False
            self._cv.notify_all()

    def _applied(self, last: int) -> None:
        """Records up to ``last`` are in the snapshot. Holds ``_cv``."""
        self._applied_lsn = last
        for key in [k for k, (lsn, _) in self._overlay.items() if lsn <= last]:
            del self._overlay[key]

    def _write_and_apply(self, batch: list[_Pending]) -> tuple[WalsyncError | None, bool]:
        """Write a large batch to the WAL while a helper thread fills its LMDB
        transaction; commit that only once the WAL write (and sync) succeeded.

        Both copy the large values, and both release the GIL doing it, so a
        big commit costs about the longer of the two, not their sum. Nothing
        is visible or in the snapshot before the commit, which comes after the
        WAL is durable (FORMAT.md invariant 4). Returns the error, and whether
        it was the apply that failed.
        """
        job = self._snapshot.apply_ahead(lambda: _puts_of([batch]))
        error = self._write_wal(batch)
        job.finish(commit=error is None)
        if error is not None or job.committed:
            return error, False
        if job.error is not None and not job.map_full:
            # the helper's write (or anything else there) failed: as after a failed
            # WAL write, trying again on the same file could report success for
            # pages the failed write lost
            return self._poison(
                job.error,
                f"applying LSN {batch[0].lsn}..{batch[-1].lsn} to the snapshot on the "
                "apply-ahead thread (the records are in the WAL and are applied when the "
                "store is reopened)",
            ), True
        # the map was full: nothing was applied; the usual way grows it
        error = self._apply_batches([batch])
        return error, error is not None

    def _write_wal(self, batch: list[_Pending]) -> WalsyncError | None:
        wal = self._wal
        assert wal is not None
        before = wal.bytes_written
        sync = any(p.sync for p in batch)
        try:
            wal.append([(p.lsn, p.payload) for p in batch], sync)
        except BaseException as exc:  # noqa: BLE001 - every failure poisons the store
            return self._poison(exc, f"WAL write to segment {wal.segment_first_lsn:016x}.wal")
        self._bytes_since_checkpoint += wal.bytes_written - before
        self._metrics.record_group_commit(len(batch), wal.bytes_written - before, sync)
        return None

    def _apply_batches(self, batches: list[list[_Pending]]) -> WalsyncError | None:
        puts, last, hlc, meta_ops = _puts_of(batches)
        try:
            self._snapshot.apply_puts(puts, last, hlc, meta_ops=meta_ops)
        except BaseException as exc:  # noqa: BLE001
            return self._poison(
                exc,
                f"applying LSN {batches[0][0].lsn}..{batches[-1][-1].lsn} to the snapshot (the "
                "records are in the WAL and are applied when the store is reopened)",
            )
        return None

    def _helper_failed(self, exc: BaseException, doing: str) -> None:
        """A helper thread's write or sync failed (the segment preparer's): no commit
        is waiting for it, so the store stops taking writes here and the next one
        says why. The first failure stays the reason."""
        with self._cv:
            if self._poisoned is None:
                self._poison(exc, doing)

    def _poison(self, exc: BaseException, doing: str) -> WalsyncError:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            error: WalsyncError = DiskFullError(
                f"disk full during {doing} in store {self.path}: {exc}"
            )
        else:
            error = StorePoisonedError(
                f"{type(exc).__name__} during {doing} in store {self.path}: {exc}; "
                "the store refuses further writes",
                # damage found while writing: reopening does not mend it, repair does
                hint=exc.hint if isinstance(exc, CorruptionError) else None,
            )
        error.__cause__ = exc
        self._poisoned = error
        log.error("%s", error)
        return error

    # -- checkpoints ---------------------------------------------------------

    def checkpoint(self) -> CheckpointResult:
        """Sync the snapshot and remove WAL segments it (and sync) no longer need."""
        if self._closed:
            raise StoreClosedError(f"store {self.path} is closed")
        self._check_writable()
        return self._checkpoint(include_active=False)

    def compact(self, *, purge_tombstones: bool = False) -> CompactResult:
        """Checkpoint, then rewrite the snapshot file without its free pages.

        LMDB reuses freed pages but never shrinks its file; after deleting
        much (retention), this gives the space back. It blocks commits and
        reads while it copies (about the time to copy the live data).
        ``purge_tombstones`` drops the tombstones of deleted keys, which are
        otherwise kept for sync; it is refused once the store has synced,
        since other replicas still need them.
        """
        self._check_writable()
        if purge_tombstones and (self.sync_state("acked_lsn") is not None
                                 or self.record_meta("pull_cursor") is not None
                                 or self.retain_floor is not None):
            raise ValueError("tombstones of a store that syncs are kept until every replica "
                             "has seen them; compact without purge_tombstones")
        checkpoint = self.checkpoint()
        # no checkpoint (background or another thread's) may sync or copy the
        # environment while it is closed for the swap
        with self._checkpoint_lock:
            with self._cv:
                while self._leading or self._queue or self._applying or self._apply_queue:
                    self._cv.wait()
                self._leading = True  # hold off group commits while the file is swapped
            try:
                before, after = self._snapshot.compact(purge_tombstones)
            finally:
                with self._cv:
                    self._leading = False
                    self._wake()  # committers that queued meanwhile wait on their own conditions
        return CompactResult(checkpoint.lsn, before, after)

    def _checkpoint(self, *, include_active: bool, new_base: bool = True) -> CheckpointResult:
        """A failed sync or removal poisons the store: a later checkpoint whose sync
        reported success could not be trusted to cover the pages this one lost,
        and it would then remove WAL segments still needed."""
        try:
            return self._checkpoint_once(include_active, new_base)
        except WalsyncError:
            raise
        except Exception as exc:
            raise _fresh(self._poison(exc, "checkpoint")) from exc

    def _checkpoint_once(self, include_active: bool, new_base: bool) -> CheckpointResult:
        with self._checkpoint_lock:
            with self._cv:
                applied = self._applied_lsn
                active = self._wal.segment_first_lsn if self._wal and not include_active else None
                self._bytes_since_checkpoint = 0
            self._snapshot.sync()
            self._checkpoint_lsn = applied
            self._metrics.record_checkpoint()
            if new_base:
                self._base_lsn = write_base(self._layout, self._snapshot)
            floor = self.retain_floor
            limit = min(applied, self._base_lsn)
            if floor is not None:
                limit = min(limit, floor - 1)
            removed, freed = self._remove_segments_through(limit, active, applied)
            self.events.emit(CheckpointEvent(lsn=applied, segments_removed=removed,
                                             bytes_removed=freed))
            return CheckpointResult(applied, removed, freed)

    def _remove_segments_through(
        self, limit: int, active: int | None, applied: int
    ) -> tuple[int, int]:
        segments = self._layout.list_segments()
        removed = freed = 0
        for i, (first, path) in enumerate(segments):
            if first == active:
                break
            if i + 1 < len(segments):
                last = segments[i + 1][0] - 1
            elif active is None:
                last = applied  # closing: the writer is gone, the last segment is sealed
            else:
                break  # the newest segment may have become active since `active` was read
            if last > limit:
                break
            freed += path.stat().st_size
            _fs.unlink(path)
            removed += 1
        if removed:
            _fs.fsync_dir(self._layout.wal_dir)
        return removed, freed

    def _request_checkpoint(self) -> None:
        if self._checkpointer is None:
            with self._cv:
                if self._checkpointer is None:
                    self._checkpointer = threading.Thread(
                        target=self._checkpoint_loop, name="walsync-checkpoint", daemon=True
                    )
                    self._checkpointer.start()
        self._checkpoint_wanted.set()

    def _checkpoint_loop(self) -> None:
        while True:
            self._checkpoint_wanted.wait()
            self._checkpoint_wanted.clear()
            if self._closed or self._poisoned is not None:
                return
            try:
                self._checkpoint(include_active=False, new_base=self._base_due())
            except Exception as exc:
                self._metrics.record_error(exc)
                log.exception("background checkpoint of %s failed", self.path)

    @property
    def closed(self) -> bool:
        """Whether the store was closed (or never opened)."""
        return self._closed

    @property
    def retain_floor(self) -> int | None:
        """The lowest LSN the WAL must keep (set by sync: first unacknowledged LSN).

        The STORE file says whether a floor holds (``sync_retain``); the snapshot
        holds its value, which moves with every acknowledgement. A snapshot that
        lost the value (rebuilt from a base older than the floor) keeps every
        record (1) until sync sets it again: never a floor too high.
        """
        raw = self._snapshot.get_meta(_RETAIN_FLOOR)
        floor = int.from_bytes(raw, "little") if raw else None
        held = self._meta.get(_SYNC_RETAIN)
        if held is False:
            return None
        if held and floor is None:
            return 1
        return floor

    def set_retain_floor(self, lsn: int | None) -> None:
        """Keep WAL records from ``lsn`` on through checkpoints, closes and compactions,
        in this process and every later open (None: drop the floor).

        The first floor is recorded in the STORE file (fsynced) before its value is
        written, so that no later open (a process without sync, `walsync checkpoint`)
        nor a snapshot rebuilt after a machine crash removes WAL the server lacks.
        ``None`` is how a store stops syncing for good (`walsync detach`): from then
        on checkpoints remove the WAL again; attaching a replicator later ships what
        the WAL lost from the snapshot (the bootstrap path).
        """
        self._check_writable()
        if lsn is not None and (not isinstance(lsn, int) or isinstance(lsn, bool) or lsn < 1):
            raise ValueError(f"a retain floor is an LSN >= 1 or None, not {lsn!r}")
        try:
            if lsn is not None:
                self._set_sync_retain(True)
            self._snapshot.put_meta(_RETAIN_FLOOR,
                                    b"" if lsn is None else lsn.to_bytes(8, "little"))
            if lsn is None:
                self._set_sync_retain(False)
        except OSError as exc:
            # a failed write, as a commit's: nothing written after it can be trusted
            raise _fresh(self._poison(exc, f"setting the WAL retain floor to {lsn}")) from exc

    def _set_sync_retain(self, held: bool) -> None:
        """Record in the STORE file whether sync holds the WAL (written only on a change)."""
        with self._store_file_lock:
            if self._meta.get(_SYNC_RETAIN, False) is held:
                return
            self._meta[_SYNC_RETAIN] = held
            write_store_file(self._layout.store_file, self._meta)

    def wal_bytes_held_for_sync(self) -> int:
        """Bytes of sealed WAL segments holding records at or above the retain floor:
        what sync alone keeps (a checkpoint with a fresh base would remove the rest).
        Grows without bound while the server is unreachable or sync was abandoned."""
        floor = self.retain_floor
        if floor is None:
            return 0
        segments = self._layout.list_segments()
        held = 0
        for i, (_first, path) in enumerate(segments[:-1]):
            if segments[i + 1][0] - 1 >= floor:
                held += _size_or_zero(path)
        return held

    # -- reads ---------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The winning value of ``key``, or ``default`` if absent or deleted."""
        self._check_open()
        raw_key = _key_bytes(key)
        raw = self._snapshot.get_entry(raw_key)
        if raw is None:
            return default
        return _value_of(self._snapshot, raw_key, raw, default)

    def get_version(self, key: str) -> Version | None:
        """The winning version of ``key``; None if absent or deleted."""
        self._check_open()
        raw_key = _key_bytes(key)
        raw = self._snapshot.get_entry(raw_key)
        if raw is None:
            return None
        best = winner(_siblings_of(self._snapshot, raw_key, raw))
        return None if best.deleted else best.version

    def get_versions(self, key: str) -> list[VersionedValue]:
        """Every visible sibling of ``key`` (tombstones have value None), winner last."""
        self._check_open()
        raw_key = _key_bytes(key)
        return _versions_of(self._snapshot, raw_key, self._snapshot.get_entry(raw_key))

    @contextmanager
    def snapshot(self) -> Iterator[ReadView]:
        """A consistent view for several reads: one LMDB read transaction.

        One thread; keep it short. Do not commit from the thread that holds
        it: should the map need to grow, the commit would wait for the view.
        """
        self._check_open()
        with self._snapshot.read() as txn:
            yield ReadView(self, txn)

    def scan(
        self,
        prefix: str = "",
        *,
        start: str | None = None,
        end: str | None = None,
        reverse: bool = False,
        limit: int | None = None,
    ) -> Iterator[tuple[str, Any]]:
        """Live keys under ``prefix`` within [start, end), in key order, from one snapshot.

        The result is read in one LMDB transaction (a consistent view) and
        then yielded; ``limit`` bounds how much is read.
        """
        return iter(self._scan(prefix, start, end, reverse, limit, values=True))

    def keys(self, prefix: str = "", *, start: str | None = None, end: str | None = None,
             limit: int | None = None) -> list[str]:
        return [k for k, _ in self._scan(prefix, start, end, False, limit, values=False)]

    def _scan(
        self, prefix: str, start: str | None, end: str | None, reverse: bool,
        limit: int | None, *, values: bool,
    ) -> list[tuple[str, Any]]:
        self._check_open()
        with self._snapshot.read() as txn:
            return self._scan_in(txn, prefix, start, end, reverse, limit, values=values)

    def _scan_in(
        self, txn: Any, prefix: str, start: str | None, end: str | None, reverse: bool,
        limit: int | None, *, values: bool,
    ) -> list[tuple[str, Any]]:
        lo = _key_bytes(prefix, allow_empty=True)
        hi = _prefix_end(lo)
        if start is not None and _key_bytes(start, allow_empty=True) > lo:
            lo = start.encode()
        if end is not None and (hi is None or _key_bytes(end, allow_empty=True) < hi):
            hi = end.encode()
        out: list[tuple[str, Any]] = []
        if limit is not None and limit <= 0:
            return out
        snapshot = self._snapshot
        for key, raw in snapshot.iter_range(txn, lo, hi, reverse):
            try:
                codec, data = _winner_data(raw)
                if data is None:
                    continue
                out.append((key.decode(), decode_value(codec, data) if values else None))
            except _UNDECODABLE as exc:
                raise _undecodable(snapshot, key, exc) from None
            if limit is not None and len(out) >= limit:
                break
        return out

    def iter_siblings(
        self, prefix: str = "", *, chunk_keys: int = 1000
    ) -> Iterator[tuple[str, list[Sibling]]]:
        """Every key under ``prefix`` with its stored siblings, tombstones included.

        Read in chunks of ``chunk_keys`` keys, each chunk from one snapshot
        (for sync's bootstrap and for export; not one consistent view).
        """
        self._check_open()
        lo = prefix.encode()
        hi = _prefix_end(lo)
        while True:
            with self._snapshot.read() as txn:
                rows: list[tuple[bytes, bytes]] = []
                for key, raw in self._snapshot.iter_range(txn, lo, hi, False):
                    rows.append((key, raw))
                    if len(rows) >= chunk_keys:
                        break
            for key, raw in rows:
                yield key.decode(), _siblings_of(self._snapshot, key, raw)
            if len(rows) < chunk_keys:
                return
            lo = rows[-1][0] + b"\x00"

    def conflicts(
        self, prefix: str = "", *, limit: int | None = None
    ) -> Iterator[tuple[str, list[VersionedValue]]]:
        """Keys under ``prefix`` in conflict, in key order, each with its siblings as
        ``get_versions`` shows them (winner last), from one snapshot.

        A key is in conflict while it holds concurrent versions with different
        values; a tombstone counts as a value, so a write that lost to a concurrent
        delete is listed though the key reads as absent. Once the server holds the
        same versions, its ``conflicts`` function lists the same keys. Read from the
        snapshot's table of keys holding several siblings (kept in each apply's own
        transaction): the cost follows the conflicts, not the store's size.
        """
        self._check_open()
        lo = _key_bytes(prefix, allow_empty=True)
        hi = _prefix_end(lo)
        out: list[tuple[str, list[VersionedValue]]] = []
        if limit is not None and limit <= 0:
            return iter(out)
        snapshot = self._snapshot
        with snapshot.read() as txn:
            for key, raw in snapshot.iter_conflicts(txn, lo, hi):
                versions = _versions_of(snapshot, key, raw)
                if len(versions) > 1:  # not siblings that hold one value
                    out.append((key.decode(), versions))
                    if limit is not None and len(out) >= limit:
                        break
        return iter(out)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"store {self.path} is closed")

    # -- information ---------------------------------------------------------

    @property
    def next_lsn(self) -> int:
        return self._next_lsn

    @property
    def applied_lsn(self) -> int:
        return self._applied_lsn if not self.readonly else self._snapshot.applied_lsn()

    @property
    def poisoned(self) -> WalsyncError | None:
        return self._poisoned

    def stats(self) -> StoreStats:
        """Counters since this process opened the store: commit latency (p50, p99),
        WAL bytes and syncs, group-commit sizes, replay at open, errors. Cheap,
        from any thread, also after close (what ``--metrics-port`` exposes)."""
        return self._metrics.snapshot(self.recovery, self.applied_lsn if not self._closed
                                      else self._applied_lsn, self._poisoned is not None)

    @property
    def wal_end_bytes(self) -> int:
        """WAL bytes through the last written frame, counted like ``WALReader.position_bytes``
        (kept segments in full, the active one without its preallocated zeros)."""
        wal = self._wal
        writing = wal is not None and wal.fd is not None
        active, written = (wal.segment_first_lsn, wal.segment_size) if wal else (0, 0)
        total = 0
        for first, path in self._layout.list_segments():
            if writing and first >= active:
                total += written
                break
            total += _size_or_zero(path)
        return total

    def info(self) -> StoreInfo:
        self._check_open()
        segments = self._layout.list_segments()
        return StoreInfo(
            path=self.path,
            node_id=self.node_id,
            applied_lsn=self.applied_lsn,
            checkpoint_lsn=self._checkpoint_lsn,
            next_lsn=self._next_lsn,
            retain_floor=self.retain_floor,
            segments=len(segments),
            wal_bytes=sum(_size_or_zero(p) for _, p in segments),
            snapshot_bytes=self._snapshot.file_bytes(),
            keys=self._snapshot.count(),
            wal_bytes_held_for_sync=self.wal_bytes_held_for_sync(),
        )


#: fencing tokens are PostgreSQL bigints on the sync server
_FENCE_LIMIT = 1 << 63


def _check_key(key: Any, max_bytes: int) -> None:
    """A key a write may use: a non-empty string of valid UTF-8, without NUL (the
    sync server stores keys as text, which cannot hold it), at most ``max_bytes``."""
    if type(key) is not str:
        raise InvalidKeyError(f"key {key!r:.60} is not a string but {type(key).__name__}")
    if not key:
        raise InvalidKeyError("key is empty")
    try:
        size = len(key.encode())
    except UnicodeEncodeError as exc:
        raise InvalidKeyError(f"key {key!r:.60} is not valid UTF-8: {exc.reason}") from None
    if size > max_bytes:
        raise InvalidKeyError(f"key {key[:40]!r}... is {size} bytes, above the limit of "
                              f"{max_bytes}")
    if "\x00" in key:
        raise InvalidKeyError(f"key {key!r:.60} holds a NUL character, which the sync server "
                              "cannot store")


def _check_fence(fence: Any, where: str) -> None:
    if type(fence) is not int:
        raise TypeError(f"fence= for {where} takes an int (a lease's fencing token), not "
                        f"{type(fence).__name__} ({fence!r:.60})")
    if not 0 <= fence < _FENCE_LIMIT:
        raise ValueError(f"fence= for {where} is {fence}, outside 0..2**63-1 (the sync "
                         "server's range); nothing was written")


def _durability_of(value: Any) -> Durability:
    if isinstance(value, Durability):
        return value
    if type(value) is str:
        try:
            return Durability(value)
        except ValueError:
            pass
    else:
        raise TypeError(f"durability= takes 'none', 'local', 'remote' or a Durability, not "
                        f"{type(value).__name__} ({value!r:.60})")
    raise ValueError(f"durability= takes 'none', 'local' or 'remote', not {value!r:.60}")


def _operations(ops: Any) -> list[Put | Delete]:
    """The operations of a commit as a list (a generator is read once)."""
    if isinstance(ops, Put | Delete | str | bytes) or not hasattr(ops, "__iter__"):
        raise TypeError(f"commit takes a list of Put and Delete operations, not "
                        f"{type(ops).__name__} ({ops!r:.60})")
    return ops if type(ops) is list else list(ops)


def _size_or_zero(path: Path) -> int:
    """A file's size; 0 if a concurrent checkpoint has just removed it."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class ReadView:
    """Reads from one consistent snapshot (see Store.snapshot)."""

    def __init__(self, store: Store, txn: Any) -> None:
        self._store = store
        self._txn = txn

    def get(self, key: str, default: Any = None) -> Any:
        raw_key = _key_bytes(key)
        snapshot = self._store._snapshot
        raw = snapshot.entry_in(self._txn, raw_key)
        if raw is None:
            return default
        return _value_of(snapshot, raw_key, raw, default)

    def get_version(self, key: str) -> Version | None:
        raw_key = _key_bytes(key)
        snapshot = self._store._snapshot
        raw = snapshot.entry_in(self._txn, raw_key)
        if raw is None:
            return None
        best = winner(_siblings_of(snapshot, raw_key, raw))
        return None if best.deleted else best.version

    def get_versions(self, key: str) -> list[VersionedValue]:
        raw_key = _key_bytes(key)
        snapshot = self._store._snapshot
        return _versions_of(snapshot, raw_key, snapshot.entry_in(self._txn, raw_key))

    def scan(self, prefix: str = "", *, start: str | None = None, end: str | None = None,
             reverse: bool = False, limit: int | None = None) -> list[tuple[str, Any]]:
        return self._store._scan_in(self._txn, prefix, start, end, reverse, limit, values=True)


def _versions_of(snapshot: SnapshotStore, key: bytes, raw: bytes | None) -> list[VersionedValue]:
    if raw is None:
        return []
    try:
        return [
            VersionedValue(None if s.data is None else decode_value(s.codec, s.data), s.version)
            for s in visible_siblings(decode_entry(raw), decode=_plain_bytes)
        ]
    except _UNDECODABLE as exc:
        raise _undecodable(snapshot, key, exc) from None


#: what decoding an entry or a value may raise when its bytes are not what a store
#: writes (cbor2 raises several kinds, not all of them its own)
_UNDECODABLE: tuple[type[BaseException], ...] = (
    CorruptionError, cbor2.CBORDecodeError, ValueError, TypeError, LookupError,
    ArithmeticError, RecursionError,
)


def _undecodable(snapshot: SnapshotStore, key: bytes, exc: BaseException) -> CorruptionError:
    """An entry whose checksum holds but which does not decode: written so, or
    damaged before it was sealed; the error names the key and the file."""
    why = str(exc) if isinstance(exc, CorruptionError) else f"{type(exc).__name__}: {exc}"
    return CorruptionError(
        f"snapshot entry of key {key_text(key)} does not decode ({why})",
        path=snapshot.data_file,
        hint="it holds what was written (its checksum matches): overwrite or delete the key, "
        "or bring it back from the sync server (`walsync restore --to NEW --prefix KEY`, then "
        "`walsync export` it there and `walsync import` it here)",
    )


def _value_of(snapshot: SnapshotStore, key: bytes, raw: bytes, default: Any) -> Any:
    """The winning value of an entry (``default`` for a tombstone)."""
    try:
        codec, data = _winner_data(raw)
        return default if data is None else decode_value(codec, data)
    except _UNDECODABLE as exc:
        raise _undecodable(snapshot, key, exc) from None


def _siblings_of(snapshot: SnapshotStore, key: bytes, raw: bytes) -> list[Sibling]:
    try:
        return decode_entry(raw)
    except CorruptionError as exc:
        raise _undecodable(snapshot, key, exc) from None


def _plain_bytes(sib: Sibling) -> tuple[bool, bytes | None]:
    """A sibling's identity for collapsing: its value's bytes before compression."""
    if sib.data is None or sib.codec == CODEC_NONE:
        return sib.data is None, sib.data
    return False, cbor2.dumps(decode_value(sib.codec, sib.data))


def _winner_data(raw: bytes) -> tuple[int, bytes | None]:
    """(codec, data) of an entry's winner; the common single-sibling entry is read
    without building Sibling objects (a read hot path: get and scan)."""
    items = cbor2.loads(raw)
    if type(items) is list and len(items) == 1 and type(items[0]) is list and len(items[0]) == 7:
        data, codec = items[0][0], items[0][1]
        if (data is None or type(data) is bytes) and type(codec) is int:
            return codec, data
    best = winner(decode_entry(raw))
    return best.codec, best.data


def _key_bytes(key: str, *, allow_empty: bool = False) -> bytes:
    if not isinstance(key, str):
        raise InvalidKeyError(f"key {key!r} is not a string but {type(key).__name__}")
    if not key and not allow_empty:
        raise InvalidKeyError("key is empty")
    try:
        return key.encode()
    except UnicodeEncodeError as exc:
        raise InvalidKeyError(f"key {key!r} is not valid UTF-8: {exc.reason}") from None


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest byte string above every string that starts with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _check_expect(key: str, expect: Any, current: list[Sibling]) -> None:
    best = winner(current) if current else None
    actual = None if best is None or best.deleted else best.version
    if expect is None:
        if actual is not None:
            raise ConflictError(key, None, actual)
        return
    if not isinstance(expect, Version):
        raise TypeError(f"expect= takes a Version, None or ANY, not {type(expect).__name__}")
    if actual is None or (actual.origin, actual.lsn) != (expect.origin, expect.lsn):
        raise ConflictError(key, expect, actual)


#: a batch of at least this many payload bytes is applied alongside its WAL
#: write (Store._write_and_apply); smaller ones the usual way, after it
_APPLY_AHEAD_BYTES = 1 << 20


def _payload_bytes(payload: bytes | list[bytes]) -> int:
    return len(payload) if isinstance(payload, bytes) else sum(len(p) for p in payload)


def _puts_of(
    batches: list[list[_Pending]],
) -> tuple[list[tuple[bytes, bytes | list[bytes]]], int, int, bool]:
    """The snapshot writes of written batches: (pairs, last LSN, highest HLC, any meta op).
    An entry in parts stays in parts: the snapshot seals and joins it in one copy."""
    puts: list[tuple[bytes, bytes | list[bytes]]] = []
    meta_ops = False
    hlc = 0
    for batch in batches:
        for p in batch:
            hlc = max(hlc, p.hlc)
            for key, entry in p.ops:
                if not key:
                    meta_ops = True
                puts.append((key.encode(), entry))
    return puts, batches[-1][-1].lsn, hlc, meta_ops


def _fresh(error: WalsyncError) -> WalsyncError:
    """A new exception per waiting thread (one instance raised in many threads
    would share and grow one traceback)."""
    copy = type(error).__new__(type(error))
    copy.__dict__.update(error.__dict__)
    copy.args = error.args
    copy.__cause__ = error.__cause__
    return copy


def _directory_identity(root: Path) -> int | None:
    """The store directory's inode number (None where the file system has none)."""
    ino = os.stat(root).st_ino
    return ino if ino else None


def read_store_file(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_bytes())
        version = int(meta["format"])
        str(meta["node_id"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WalsyncError(
            f"cannot read store metadata {path}: {exc}",
            hint="the STORE file is damaged; restore it from a backup or `walsync restore`",
        ) from None
    if version not in _STORE_FORMATS_READ:
        raise FormatVersionError(
            f"store format version {version} is not supported by this walsync, which reads "
            f"versions {', '.join(map(str, _STORE_FORMATS_READ))}",
            path=str(path),
        )
    return dict(meta)


def write_store_file(path: Path, meta: dict[str, Any]) -> None:
    """Replace the STORE file atomically (tmp, fsync, rename, fsync dir), in the store
    format this walsync writes (a store 1 file rewritten becomes store 2)."""
    meta["format"] = STORE_FORMAT_VERSION
    _fs.atomic_write(path, json.dumps(meta, indent=1, sort_keys=True).encode())
