"""Store: a directory with a WAL, an LMDB snapshot and one writer process.

(Over 500 lines: it is the whole public API, each method with its documentation;
the work behind each is in the module named below.)

What is durable when a commit returns: with durability ``local`` (the
default) its WAL frame was fdatasync'ed and it was applied to the snapshot, so
this process reads it back and a crash of the process or the machine keeps
it. With ``none`` it was written and applied but not synced: a process crash
keeps it, a power loss may not.

Threads: a Store may be shared by any number of threads; commits join a group
commit (engine/commit.py). Not fork-safe: open the store after forking.

This class is the facade: it opens and closes the store and hands each call to
the part that does it. Commits: engine/commit.py (the pipeline) and
engine/assign.py (LSNs, versions, records); the operations and their checks:
engine/ops.py; reads: engine/reads.py; checkpoints and compaction:
engine/checkpointing.py; what sync needs: engine/replication.py; the STORE
file: engine/storefile.py; whether the handle may still write:
engine/health.py. ``put`` and ``commit`` call the pipeline directly, so the
facade adds no call to a commit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .assign import Assigner
from .base import clear_open_marker
from .checkpointing import Checkpointer
from .commit import CommitPipeline
from .errors import NoReplicatorError, WalsyncError, error_from_os
from .events import Event, EventBus
from .feed import WALReader
from .handoff import InboxApplier
from .health import Health, fresh
from .identity import NodeIdentity
from .layout import StoreLayout
from .lock import WriterLock
from .metrics import StoreMetrics, StoreStats
from .opening import open_store
from .ops import (
    ANY,
    Batch,
    CheckpointResult,
    CommitResult,
    CompactResult,
    Delete,
    Put,
    StoreInfo,
    VersionedValue,
    check_fence,
    durability_of,
)
from .options import Durability, StoreOptions
from .reads import (
    ReadView,
    count_keys,
    key_bytes,
    scan_in,
    siblings_of,
    value_of,
    versions_of,
)
from .reads import conflicts as read_conflicts
from .reads import iter_siblings as read_siblings
from .replay import RecoveryReport
from .replication import (
    PULL_CURSOR,
    SYNC_STATE_PREFIX,
    Acknowledger,
    ReplicationSource,
    SyncLedger,
)
from .snapshot import SnapshotStore
from .storefile import (
    STORE_FORMAT_VERSION,
    StoreFile,
    read_store_file,
    write_store_file,
)
from .versions import Sibling, Version, winner

__all__ = [
    "ANY",
    "STORE_FORMAT_VERSION",
    "Batch",
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


class Store:
    """A walsync store. Open with :meth:`Store.open`; use as a context manager."""

    def __init__(self) -> None:  # use Store.open
        self.path = ""
        self.options = StoreOptions()
        self.readonly = False
        self.recovery: RecoveryReport | None = None
        self._layout: StoreLayout
        self._snapshot: SnapshotStore
        self._store_file: StoreFile
        self._assigner: Assigner
        self._pipeline: CommitPipeline
        self._checkpointer: Checkpointer
        self._ledger: SyncLedger
        self._lock: WriterLock | None = None
        self._inbox: InboxApplier | None = None
        self._health = Health("", False)
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
        self._health = Health(self.path, self.readonly)
        parts = open_store(root, self.options, self._health, self._metrics, self.events,
                           readonly=self.readonly, create=create, node_id=node_id)
        self._layout = parts.layout
        self._lock = parts.lock
        self._inbox = parts.inbox
        self._store_file = parts.store_file
        self._snapshot = parts.snapshot
        self._assigner = parts.assigner
        self._pipeline = parts.pipeline
        self._checkpointer = parts.checkpointer
        self._ledger = parts.ledger
        self.recovery = parts.recovery

    def close(self) -> None:
        """Finish pending commits, checkpoint, and release the writer lock."""
        if self._health.closed:
            return
        pipeline = self._pipeline
        if self._inbox is not None:
            self._inbox.stop()
        pipeline.close()
        self._checkpointer.stop()
        wal = pipeline.wal
        try:
            if wal is not None and self._health.poisoned is None:
                wal.sync()
                # a small session's close stays cheap (no copy unless due)
                new_base = self._checkpointer.base_due()
                wal.close(trim=True)
                self._checkpointer.run(include_active=True, new_base=new_base)
                clear_open_marker(self._layout)
        except WalsyncError:
            raise
        except Exception as exc:
            # nothing is lost (the WAL holds every record) but this handle
            # cannot finish: say so, as a write failure would
            raise fresh(self._health.poison(exc, "close")) from exc
        finally:
            # subscribers get what was published, then their delivery ends
            self.events.close()
            if wal is not None:
                wal.close()
            self._snapshot.close()
            if self._ledger.sync_lock is not None:
                self._ledger.sync_lock.release()
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes (engine/commit.py) ---------------------------------------------

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
        return self._pipeline.commit([Put(key, value, expect, fence)], durability)

    def delete(
        self,
        key: str,
        *,
        expect: Any = ANY,
        durability: Durability | str | None = None,
        fence: int = 0,
    ) -> CommitResult:
        """Write a tombstone for ``key`` (a versioned delete, so sync can merge it)."""
        return self._pipeline.commit([Delete(key, expect, fence)], durability)

    def batch(self, durability: Durability | str | None = None, *, fence: int = 0,
              internal: bool = False) -> Batch:
        """Operations committed together; ``fence`` stamps a lease token on each (sync);
        ``internal`` as for ``commit``."""
        if durability is not None:
            durability_of(durability)
        check_fence(fence, "the batch")
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
        return self._pipeline.commit(ops, durability, notes, internal)

    def apply_remote(
        self, items: Sequence[tuple[str, Sibling]], *, pull_cursor: int | None = None
    ) -> CommitResult | None:
        """Merge versions pulled from other nodes, as one durable record of their own.

        The record goes through the WAL like a local commit (so pulled state
        is replayable) but is marked as a merge, which the replicator never
        ships back. ``pull_cursor`` (the server position the items were pulled up
        to) is set by the same record. Returns None when there was nothing to write.
        """
        meta = None if pull_cursor is None else {PULL_CURSOR: pull_cursor}
        return self._pipeline.merge(items, meta)

    def flush(self) -> None:
        """Make every written record durable (fdatasync), e.g. after 'none' commits."""
        self._pipeline.flush()

    # -- node identity (engine/identity.py) ------------------------------------

    @property
    def node_id(self) -> str:
        """The node id this store writes under now (the last of ``identities``)."""
        return self._assigner.node_id

    @property
    def identities(self) -> tuple[NodeIdentity, ...]:
        """Every node id this store wrote under, oldest first, with the LSNs each one
        owns (engine/identity.py); the last is ``node_id``."""
        return self._assigner.identities

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
        return self._store_file.copied_from()

    def record_directory(self) -> None:
        """Take the store's directory as its own (a store made before directories were
        recorded; ``renew_node_id`` does it too)."""
        self._health.check_writable()
        self._store_file.record_directory()

    def renew_node_id(self, fork_lsn: int, *, reason: str) -> NodeIdentity:
        """Take a fresh node id, owning every LSN above ``fork_lsn``; returns it.

        For a store that finds it shares its node id with another (a copy, a restore
        over an old directory): from now on nothing of it is written under the old id
        (PROTOCOL.md, Node identity). Its own versions written under the old id above
        ``fork_lsn`` (those no server confirmed as the original's) are relabelled to the
        new id with the same LSNs, in one durable merge record (never shipped) that also carries the
        new identity chain; the STORE file follows. Records still in the WAL below
        that record are shipped the same way (``engine.identity.translate_vv``).
        ``fork_lsn`` is the last LSN the server holds as this store wrote it.

        Scans the whole snapshot while commits wait: a rare event. Leases taken under
        the old id are not this store's any more (their holder is the old id).
        """
        self._health.check_writable()
        current = self.identities[-1]
        if type(fork_lsn) is not int or not current.base_lsn <= fork_lsn:
            raise ValueError(f"fork LSN {fork_lsn!r} of store {self.path} is below the first "
                             f"LSN node id {current.node_id} owns ({current.start_lsn})")
        ident = self._pipeline.renew(fork_lsn, reason)
        self._store_file.record_identities(self.identities, here=True)
        self._ledger.forget_incarnation_tokens()
        log.warning("store %s: took node id %s (was %s) for LSNs after %d: %s", self.path,
                    ident.node_id, current.node_id, fork_lsn, reason)
        return ident

    def incarnation_tokens(self) -> list[str]:
        """The tokens sync claimed the current node id with on its servers, newest
        first (sync/incarnation.py): a server gives the id to the store that shows
        the token it holds, and to no copy made before the claim."""
        return self._ledger.incarnation_tokens()

    def add_incarnation_token(self, token: str) -> None:
        """Remember a token before a server is told it: in the STORE file (or ``SYNC``,
        once a sync worker synced the store), fsynced (a claim the store forgot would
        make it renew its id for nothing)."""
        self._health.check_writable()
        self._ledger.add_incarnation_token(token)

    # -- what sync needs (engine/replication.py) ---------------------------------

    def add_commit_listener(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(lsn)`` in the committing thread after each commit; it must not block.

        The replicator's wake-up: immediate, and no queue can lose it. Hooks
        that may be slow or fail subscribe to ``store.events`` instead.
        """
        self._pipeline.listeners.append(listener)

    def remove_commit_listener(self, listener: Callable[[int], None]) -> None:
        self._pipeline.listeners.remove(listener)

    def attach_replicator(self, replicator: Acknowledger) -> None:
        """Enable durability 'remote': ``replicator.wait_acknowledged(lsn, timeout)``.

        Takes ``SYNC.lock`` (engine/handoff.py): one replicator per store, in this
        process or a sync worker's; a SyncError names the process that has it."""
        if self._ledger.sync_lock is not None:
            self._ledger.sync_lock.acquire("a replicator")
        self._pipeline.replicator = replicator

    def detach_replicator(self, replicator: Acknowledger, because: str | None = None) -> None:
        """Disable durability 'remote' again; ``because`` is said to its next caller."""
        pipeline = self._pipeline
        if pipeline.replicator is replicator:
            pipeline.replicator = None
            pipeline.detached_because = because
            if self._ledger.sync_lock is not None:
                self._ledger.sync_lock.release()

    @property
    def shippable_lsn(self) -> int:
        """The highest LSN both durable in the WAL and applied: safe to ship."""
        wal = self._pipeline.wal
        return 0 if wal is None else min(wal.synced_lsn, self._pipeline.applied_lsn)

    def wal_reader(self) -> WALReader:
        return WALReader(self._layout)

    @property
    def sync_ledger(self) -> SyncLedger:
        """Sync's bookkeeping in this store, each field by name and type."""
        return self._ledger

    def sync_state(self, name: str) -> bytes | None:
        """A host-local note in the snapshot's meta table (never shipped, pulled,
        exported or restored; durable at the next checkpoint), for the layers above
        the engine (the workflow layer's leases). Sync's own fields: ``sync_ledger``."""
        return self._snapshot.get_meta(SYNC_STATE_PREFIX + name.encode())

    def set_sync_state(self, name: str, value: bytes) -> None:
        self._health.check_writable()
        try:
            self._snapshot.put_meta(SYNC_STATE_PREFIX + name.encode(), value)
        except OSError as exc:
            raise fresh(self._health.poison(exc, f"writing sync state {name!r}")) from exc

    @property
    def retain_floor(self) -> int | None:
        """The lowest LSN the WAL must keep (set by sync: first unacknowledged LSN)."""
        return self._ledger.retain_floor

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
        self._ledger.set_retain_floor(lsn)

    def wal_bytes_held_for_sync(self) -> int:
        """Bytes of sealed WAL segments holding records at or above the retain floor:
        what sync alone keeps (a checkpoint with a fresh base would remove the rest).
        Grows without bound while the server is unreachable or sync was abandoned."""
        return self._checkpointer.wal_bytes_held(self.retain_floor)

    # -- checkpoints (engine/checkpointing.py) -------------------------------------

    def checkpoint(self) -> CheckpointResult:
        """Sync the snapshot and remove WAL segments it (and sync) no longer need."""
        return self._checkpointer.checkpoint()

    def compact(self, *, purge_tombstones: bool = False) -> CompactResult:
        """Checkpoint, then rewrite the snapshot file without its free pages.

        LMDB reuses freed pages but never shrinks its file; after deleting
        much (retention), this gives the space back. It blocks commits and
        reads while it copies (about the time to copy the live data).
        ``purge_tombstones`` drops the tombstones of deleted keys, which are
        otherwise kept for sync; it is refused once the store has synced,
        since other replicas still need them.
        """
        self._health.check_writable()
        if purge_tombstones and (self._ledger.synced_before
                                 or self._ledger.retain_floor is not None):
            raise ValueError("tombstones of a store that syncs are kept until every replica "
                             "has seen them; compact without purge_tombstones")
        return self._checkpointer.compact(purge_tombstones)

    # -- reads (engine/reads.py) ---------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The winning value of ``key``, or ``default`` if absent or deleted."""
        self._health.check_open()
        raw_key = key_bytes(key)
        raw = self._snapshot.get_entry(raw_key)
        if raw is None:
            return default
        return value_of(self._snapshot, raw_key, raw, default)

    def get_version(self, key: str) -> Version | None:
        """The winning version of ``key``; None if absent or deleted."""
        self._health.check_open()
        raw_key = key_bytes(key)
        raw = self._snapshot.get_entry(raw_key)
        if raw is None:
            return None
        best = winner(siblings_of(self._snapshot, raw_key, raw))
        return None if best.deleted else best.version

    def get_versions(self, key: str) -> list[VersionedValue]:
        """Every visible sibling of ``key`` (tombstones have value None), winner last."""
        self._health.check_open()
        raw_key = key_bytes(key)
        return versions_of(self._snapshot, raw_key, self._snapshot.get_entry(raw_key))

    @contextmanager
    def snapshot(self) -> Iterator[ReadView]:
        """A consistent view for several reads: one LMDB read transaction.

        One thread; keep it short. Do not commit from the thread that holds
        it: should the map need to grow, the commit would wait for the view.
        """
        self._health.check_open()
        with self._snapshot.read() as txn:
            yield ReadView(self._snapshot, txn)

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
        self._health.check_open()
        with self._snapshot.read() as txn:
            return scan_in(self._snapshot, txn, prefix, start, end, reverse, limit,
                           values=values)

    def iter_siblings(
        self, prefix: str = "", *, chunk_keys: int = 1000
    ) -> Iterator[tuple[str, list[Sibling]]]:
        """Every key under ``prefix`` with its stored siblings, tombstones included.

        Read in chunks of ``chunk_keys`` keys, each chunk from one snapshot
        (for sync's bootstrap and for export; not one consistent view).
        """
        self._health.check_open()
        return read_siblings(self._snapshot, prefix, chunk_keys)

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
        self._health.check_open()
        return iter(read_conflicts(self._snapshot, prefix, limit))

    def count_keys(self, prefix: str = "") -> int:
        """Keys under ``prefix``, tombstones included, counted without decoding them."""
        self._health.check_open()
        return count_keys(self._snapshot, prefix)

    # -- information ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the store was closed (or never opened)."""
        return self._health.closed

    @property
    def next_lsn(self) -> int:
        return self._assigner.next_lsn

    @property
    def applied_lsn(self) -> int:
        """The last LSN in the snapshot; records acknowledged and on their way to it
        (engine/commit.py) are waited for."""
        if self.readonly:
            return self._snapshot.applied_lsn()
        self._pipeline.catch_up()
        return self._pipeline.applied_lsn

    @property
    def poisoned(self) -> WalsyncError | None:
        return self._health.poisoned

    def stats(self) -> StoreStats:
        """Counters since this process opened the store: commit latency (p50, p99),
        WAL bytes and syncs, group-commit sizes, replay at open, errors. Cheap,
        from any thread, also after close (what ``--metrics-port`` exposes)."""
        return self._metrics.snapshot(self.recovery, self.applied_lsn if not self.closed
                                      else self._pipeline.applied_lsn,
                                      self._health.poisoned is not None)

    @property
    def wal_end_bytes(self) -> int:
        """WAL bytes through the last written frame, counted like ``WALReader.position_bytes``
        (kept segments in full, the active one without its preallocated zeros)."""
        return self._checkpointer.wal_end_bytes()

    def info(self) -> StoreInfo:
        self._health.check_open()
        segments, wal_bytes = self._checkpointer.wal_bytes()
        return StoreInfo(
            path=self.path,
            node_id=self.node_id,
            applied_lsn=self.applied_lsn,
            checkpoint_lsn=self._checkpointer.checkpoint_lsn,
            next_lsn=self.next_lsn,
            retain_floor=self.retain_floor,
            segments=segments,
            wal_bytes=wal_bytes,
            snapshot_bytes=self._snapshot.file_bytes(),
            keys=self._snapshot.count(),
            wal_bytes_held_for_sync=self.wal_bytes_held_for_sync(),
        )


if TYPE_CHECKING:
    def _is_a_replication_source(store: Store) -> ReplicationSource:
        """mypy's proof that a Store is all a replicator needs (engine/replication.py)."""
        return store
