"""Opening a store: the order in which its parts are found, checked and put together.

The order is what makes an open safe after any crash: the writer lock first;
the STORE file (written first at creation, so it marks a store); the snapshot
rebuilt from its base if the machine went down under it (engine/base.py); the
OPEN marker before LMDB writes a page; the snapshot; the WAL replayed into it
(engine/replay.py); the node identities (a renewal's record rolled forward);
then the commit pipeline, checkpoints and sync's bookkeeping over them, the WAL
writer, and a base where a power loss would otherwise leave nothing to rebuild
from; last, a writer merges what a sync worker pulled meanwhile
(engine/handoff.py) and goes on merging it while open. An open that fails closes
what it opened and leaves the store as it found it. A store this process cannot
write (a read-only file system) opens read-only only.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from . import _fs
from .assign import Assigner
from .base import (
    SnapshotRebuild,
    clear_open_marker,
    read_base_lsn,
    trust_snapshot,
    write_open_marker,
)
from .checkpointing import Checkpointer
from .commit import CommitPipeline
from .errors import ReadOnlyStoreError, StoreNotFoundError, WalsyncError
from .events import EventBus
from .handoff import InboxApplier, SyncFile, worker_acknowledger
from .health import Health
from .layout import StoreLayout
from .lock import WriterLock, writable_directory
from .metrics import StoreMetrics
from .options import StoreOptions
from .replay import RecoveryReport, gap_allowed, recover, tail_may_be_torn
from .replication import SyncLedger
from .snapshot import SnapshotStore
from .storefile import IDENTITIES, StoreFile, create_store_file
from .versions import HybridClock
from .wal import SegmentScan, WALWriter

__all__ = ["OpenedStore", "open_store"]

log = logging.getLogger("walsync.store")


@dataclass
class OpenedStore:
    """The parts of an open store (Store holds them)."""

    layout: StoreLayout
    lock: WriterLock | None
    store_file: StoreFile
    snapshot: SnapshotStore
    assigner: Assigner
    pipeline: CommitPipeline
    checkpointer: Checkpointer
    ledger: SyncLedger
    #: what a writer's open replayed (None for a reader)
    recovery: RecoveryReport | None
    #: merges the pages a sync worker pulled (None for a reader)
    inbox: InboxApplier | None = None


def open_store(root: Path, options: StoreOptions, health: Health, metrics: StoreMetrics,
               events: EventBus, *, readonly: bool, create: bool,
               node_id: str | None) -> OpenedStore:
    """Open (and with ``create`` make) the store at ``root``; ``health`` is marked open."""
    path = str(root)
    layout = StoreLayout(root)
    marked_after_clean_close = False
    lock: WriterLock | None = None
    snapshot: SnapshotStore | None = None
    wal: WALWriter | None = None
    recovery: RecoveryReport | None = None
    if not layout.store_file.exists() and (readonly or not create):
        raise StoreNotFoundError(f"no walsync store at {root}")
    if not readonly:
        if not root.exists():
            _fs.make_dir(root, parents=True)
        elif not writable_directory(root):
            raise ReadOnlyStoreError(
                f"store {root} cannot be written here (a read-only file system or mount, "
                "or no write permission): it opens read-only only",
                hint="open it with readonly=True (the CLI's read commands do that by "
                "themselves), or from where it can be written")
        lock = WriterLock(layout.lock_file, path)
        lock.acquire(options.lock_timeout_seconds)
    try:
        if not layout.store_file.exists():
            # under the lock: one creator wins
            create_store_file(root, layout.store_file, layout.wal_dir, node_id)
        store_file = StoreFile(layout.store_file, root)
        gaps = store_file.lsn_gaps()
        rebuild = trust_snapshot(layout, readonly=readonly)
        # read before this writer's own marker replaces the last one's: the
        # rule verify and repair apply too
        closed_cleanly = not tail_may_be_torn(layout)
        if not readonly:
            # before LMDB writes a page (creating its file, replaying): a power
            # loss from here on leaves the marker, and the next boot rebuilds
            # the snapshot instead of trusting pages that were never synced
            write_open_marker(layout)
            marked_after_clean_close = closed_cleanly
        snapshot = SnapshotStore(layout.snapshot_dir, map_size_bytes=options.map_size_bytes,
                                 readonly=readonly)
        next_lsn, active = 1, None
        if not readonly:
            recovery, active, next_lsn = _recover(layout, snapshot, store_file, gaps,
                                                  closed_cleanly, rebuild)
        identities = store_file.resolve_identities(
            snapshot.get_record_meta(IDENTITIES), node_id, writer=not readonly)
        assigner = Assigner(snapshot, identities, next_lsn, HybridClock(snapshot.last_hlc()))
        pipeline = CommitPipeline(path, health, assigner, snapshot, options, metrics, events,
                                  snapshot.applied_lsn())
        ledger = SyncLedger(snapshot, store_file, health, root)
        checkpointer = Checkpointer(path, layout, snapshot, pipeline, health, metrics, events,
                                    ledger, read_base_lsn(layout))
        pipeline.on_checkpoint_due = checkpointer.request
        if not readonly:
            pipeline.wal = wal = WALWriter(layout, segment_bytes=options.segment_bytes,
                                           next_lsn=next_lsn, active=active,
                                           on_failure=pipeline.helper_failed)
            if store_file.sync_retain is None and ledger.retain_floor is not None:
                store_file.set_sync_retain(True)  # a floor set before STORE recorded floors
            checkpointer.base_at_open(gaps)
            pipeline.worker_acknowledger = functools.partial(worker_acknowledger, root,
                                                             SyncFile(root))
        health.closed = False
        inbox = None
        if not readonly:
            # what a sync worker pulled while no writer was open, or before a crash
            inbox = InboxApplier(root, pipeline, snapshot, health)
            try:
                inbox.drain()
            except (WalsyncError, OSError) as exc:
                log.error("store %s: merging the pages the sync worker pulled failed: %s",
                          root, exc)
            inbox.start()
        return OpenedStore(layout, lock, store_file, snapshot, assigner, pipeline,
                           checkpointer, ledger, recovery, inbox)
    except BaseException:
        # Close what was opened: a leaked LMDB handle would make every later
        # open (or repair) of this store in this process fail.
        if wal is not None:
            wal.close()
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
        if lock is not None:
            lock.release()
        raise


def _recover(layout: StoreLayout, snapshot: SnapshotStore, store_file: StoreFile,
             gaps: list[tuple[int, int]], closed_cleanly: bool, rebuild: SnapshotRebuild | None,
             ) -> tuple[RecoveryReport, SegmentScan | None, int]:
    """Replay the WAL into the snapshot (engine/replay.py); a hole a repair left in the
    log is recorded in the STORE file (``gaps`` too), a torn tail cut is logged."""
    _fs.make_dir(layout.wal_dir)
    recovery, active, next_lsn = recover(
        layout, snapshot, gaps, store_file.min_next_lsn, closed_cleanly=closed_cleanly)
    if recovery.wal_hole is not None and not gap_allowed(gaps, *recovery.wal_hole):
        gaps.append(recovery.wal_hole)
        store_file.set_lsn_gaps(gaps)
    if recovery.torn_tail is not None:
        log.warning("store %s: torn tail cut on open: %s", layout.root, recovery.torn_tail)
    if rebuild is not None:
        recovery = replace(recovery, snapshot_rebuilt=rebuild)
    return recovery, active, next_lsn
