"""Checkpoints: making the snapshot durable, so the WAL below it may go.

A checkpoint syncs the snapshot, sometimes writes a new *base* (a compact,
fsynced copy of the snapshot, engine/base.py: after a power loss LMDB's
unsynced pages cannot be trusted, and the base and the WAL above it rebuild
them), then removes the WAL segments that everything still needing records
has: at most the applied LSN, the base's LSN, and below sync's retain floor
(engine/replication.py). Commits start one in the background once enough WAL
was written; closing the store runs the last. A failed sync or removal
poisons the store: a later checkpoint whose sync reported success could not be
trusted to cover the pages this one lost, and it would then remove WAL
segments still needed.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from . import _fs
from .base import base_outdated, write_base
from .commit import CommitPipeline
from .errors import WalsyncError
from .events import CheckpointEvent, EventBus
from .health import Health, fresh
from .layout import StoreLayout
from .metrics import StoreMetrics
from .ops import CheckpointResult, CompactResult
from .replication import SyncLedger
from .snapshot import SnapshotStore
from .snapshot import bulk as snapshot_bulk

__all__ = ["Checkpointer", "size_or_zero"]

log = logging.getLogger("walsync.store")


class Checkpointer:
    """The checkpoints of one open store, and its background checkpoint thread."""

    def __init__(self, path: str, layout: StoreLayout, snapshot: SnapshotStore,
                 pipeline: CommitPipeline, health: Health, metrics: StoreMetrics,
                 events: EventBus, ledger: SyncLedger, base_lsn: int) -> None:
        self._path = path
        self._layout = layout
        self._snapshot = snapshot
        self._pipeline = pipeline
        self._health = health
        self._metrics = metrics
        self._events = events
        #: sync's retain floor: no checkpoint removes WAL the server lacks
        self._ledger = ledger
        #: one checkpoint (or compaction) at a time
        self._lock = threading.Lock()
        #: the LSN the snapshot's base copy holds; WAL at or below it may go
        self.base_lsn = base_lsn
        #: the applied LSN the last checkpoint made durable (0: none in this process)
        self.checkpoint_lsn = 0
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None

    def checkpoint(self) -> CheckpointResult:
        """Sync the snapshot and remove WAL segments it (and sync) no longer need."""
        self._health.check_writable()
        return self.run(include_active=False)

    def compact(self, purge_tombstones: bool) -> CompactResult:
        """Checkpoint, then rewrite the snapshot file without its free pages (Store.compact)."""
        checkpoint = self.checkpoint()
        # no checkpoint (background or another thread's) may sync or copy the
        # environment while it is closed for the swap
        with self._lock, self._pipeline.held():
            before, after = snapshot_bulk.compact(self._snapshot, purge_tombstones)
        return CompactResult(checkpoint.lsn, before, after)

    def run(self, *, include_active: bool, new_base: bool = True) -> CheckpointResult:
        """One checkpoint; ``include_active``: the WAL writer is closed (the store is
        closing), its last segment may go too. A failure poisons the store."""
        try:
            return self._once(include_active, new_base)
        except WalsyncError:
            raise
        except Exception as exc:
            raise fresh(self._health.poison(exc, "checkpoint")) from exc

    def _once(self, include_active: bool, new_base: bool) -> CheckpointResult:
        pipeline = self._pipeline
        with self._lock:
            pipeline.catch_up()  # every record acknowledged so far goes into this one
            with pipeline.cv:
                applied = pipeline.applied_lsn
                wal = pipeline.wal
                active = wal.segment_first_lsn if wal and not include_active else None
                pipeline.bytes_since_checkpoint = 0
            self._snapshot.sync()
            self.checkpoint_lsn = applied
            self._metrics.record_checkpoint()
            if new_base:
                self.base_lsn = write_base(self._layout, self._snapshot)
            floor = self._ledger.retain_floor
            limit = min(applied, self.base_lsn)
            if floor is not None:
                limit = min(limit, floor - 1)
            removed, freed = self._remove_segments_through(limit, active, applied)
            self._events.emit(CheckpointEvent(lsn=applied, segments_removed=removed,
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

    # -- the WAL's bytes, and when a base is due ------------------------------------

    def base_at_open(self, gaps: list[tuple[int, int]]) -> None:
        """A writer's open: make a base where a power loss would otherwise leave
        nothing to rebuild the snapshot from (a store whose WAL was trimmed before
        bases existed, or that a repair left with holes), or where the base holds
        unsealed values (an older format); then count the WAL a checkpoint may free."""
        pipeline = self._pipeline
        if (self.base_lsn == 0 and not self._wal_rebuilds_from_empty(gaps)) \
                or base_outdated(self._layout):
            self._snapshot.sync()
            self.base_lsn = write_base(self._layout, self._snapshot)
        pipeline.bytes_since_checkpoint = self.wal_bytes_above_base()

    def _wal_rebuilds_from_empty(self, gaps: list[tuple[int, int]]) -> bool:
        """Whether replaying the whole WAL into an empty snapshot gives the state."""
        if self._pipeline.applied_lsn == 0:
            return True
        segments = self._layout.list_segments()
        return bool(segments) and segments[0][0] == 1 and not gaps

    def wal_bytes_held(self, floor: int | None) -> int:
        """Bytes of sealed WAL segments holding records at or above ``floor`` (sync's
        retain floor): what sync alone keeps."""
        if floor is None:
            return 0
        segments = self._layout.list_segments()
        held = 0
        for i, (_first, path) in enumerate(segments[:-1]):
            if segments[i + 1][0] - 1 >= floor:
                held += size_or_zero(path)
        return held

    def wal_end_bytes(self) -> int:
        """WAL bytes through the last written frame (Store.wal_end_bytes)."""
        wal = self._pipeline.wal
        writing = wal is not None and wal.fd is not None
        active, written = (wal.segment_first_lsn, wal.segment_size) if wal else (0, 0)
        total = 0
        for first, path in self._layout.list_segments():
            if writing and first >= active:
                total += written
                break
            total += size_or_zero(path)
        return total

    def wal_bytes(self) -> tuple[int, int]:
        """(segments, bytes) of the WAL as it is on disk."""
        segments = self._layout.list_segments()
        return len(segments), sum(size_or_zero(p) for _, p in segments)

    def base_due(self) -> bool:
        """A new base (a compact copy of the snapshot's live pages) is worth it once
        the WAL it lets go outweighs them: writes are at most doubled, the disk the
        WAL takes stays below the live data's, and so does what an open scans."""
        live = self._snapshot.live_bytes()
        with self._pipeline.cv:
            return self.wal_bytes_above_base() >= live

    def wal_bytes_above_base(self) -> int:
        """WAL bytes a checkpoint would let go: closing makes no base, so a
        store used in many short sessions still checkpoints when this is due."""
        wal = self._pipeline.wal
        assert wal is not None
        sealed = sum(path.stat().st_size for first, path in self._layout.list_segments()
                     if first > self.base_lsn and first != wal.segment_first_lsn)
        return sealed + wal.segment_size

    # -- the background thread -----------------------------------------------------

    def request(self) -> None:
        """Have the background thread checkpoint (a commit found enough WAL written)."""
        if self._thread is None:
            with self._pipeline.cv:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._loop, name="walsync-checkpoint", daemon=True
                    )
                    self._thread.start()
        self._wanted.set()

    def stop(self) -> None:
        """End the background thread (the store is closed: it finds nothing to do)."""
        self._wanted.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._health.closed or self._health.poisoned is not None:
                return
            try:
                self.run(include_active=False, new_base=self.base_due())
            except Exception as exc:
                self._metrics.record_error(exc)
                log.exception("background checkpoint of %s failed", self._path)


def size_or_zero(path: Path) -> int:
    """A file's size; 0 if a concurrent checkpoint has just removed it."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
