"""`verify` and `inspect`: read a store and report, never modify it.

Safe to run while a writer is active: it takes no lock and opens the snapshot
read-only. A frame being written at that moment may show as a torn tail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CorruptionError, StoreNotFoundError
from .layout import StoreLayout
from .record import decode_payload
from .replay import gap_allowed
from .snapshot import SnapshotStore, SnapshotUninitialisedError, compaction_survivor
from .store import read_store_file
from .wal import TornTail, scan_segment

__all__ = ["Damage", "SegmentReport", "VerifyReport", "verify"]


@dataclass(frozen=True)
class SegmentReport:
    name: str
    first_lsn: int
    last_lsn: int
    records: int
    size_bytes: int


@dataclass(frozen=True)
class Damage:
    message: str
    path: str | None
    offset: int | None
    lsn: int | None


@dataclass
class VerifyReport:
    path: str
    node_id: str
    applied_lsn: int
    segments: list[SegmentReport] = field(default_factory=list)
    damage: list[Damage] = field(default_factory=list)
    torn_tail: TornTail | None = None
    lsn_gaps: list[tuple[int, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No damage (a torn tail is not damage: the next open cuts it)."""
        return not self.damage

    @property
    def records(self) -> int:
        return sum(s.records for s in self.segments)

    @property
    def first_lsn(self) -> int | None:
        return self.segments[0].first_lsn if self.segments else None

    @property
    def last_lsn(self) -> int | None:
        return self.segments[-1].last_lsn if self.segments else None

    @property
    def wal_bytes(self) -> int:
        return sum(s.size_bytes for s in self.segments)


def verify(
    path: str | Path,
    *,
    decode_payloads: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Check every frame of every segment, LSN continuity and the snapshot's position.

    ``progress(bytes_done, bytes_total)`` is called after each segment.
    """
    layout = StoreLayout(path)
    if not layout.store_file.exists():
        raise StoreNotFoundError(f"no walsync store at {path}")
    meta = read_store_file(layout.store_file)
    gaps = [(int(a), int(b)) for a, b in meta.get("lsn_gaps", [])]
    applied = 0
    # a compaction killed between its renames leaves the snapshot under another name
    snapshot_dir = compaction_survivor(layout.snapshot_dir)
    data_file = snapshot_dir / "data.mdb"
    # An empty data.mdb is an environment whose creation was cut short (a crash
    # in the first open, or in a rebuild after snapshot/ was removed): an empty
    # snapshot that the next writer initialises, not damage. LMDB cannot open
    # it read-only.
    if data_file.exists() and data_file.stat().st_size > 0:
        try:
            snapshot = SnapshotStore(snapshot_dir, map_size_bytes=1 << 20, readonly=True)
        except SnapshotUninitialisedError:
            snapshot = None  # as empty as a 0-byte file: the next writer creates the tables
        if snapshot is not None:
            try:
                applied = snapshot.applied_lsn()
            finally:
                snapshot.close()
    report = VerifyReport(str(path), str(meta["node_id"]), applied, lsn_gaps=gaps)
    segments = layout.list_segments()
    total = sum(p.stat().st_size for _, p in segments)
    done = 0
    prev_last: int | None = None
    # only a writer that died with the store open (or is running) can have
    # left a torn tail; after a clean close the whole WAL was synced
    may_be_torn = not layout.closed_cleanly()
    for i, (first, seg_path) in enumerate(segments):
        is_last = i == len(segments) - 1 and may_be_torn
        if progress is not None:
            progress(done, total)
        done += seg_path.stat().st_size
        if prev_last is not None and first != prev_last + 1 and not gap_allowed(
            gaps, prev_last + 1, first - 1
        ):
            report.damage.append(
                Damage(
                    f"LSN gap: this segment starts at {first}, the previous one ends at "
                    f"{prev_last}",
                    str(seg_path), 0, prev_last + 1,
                )
            )
        try:
            scan = scan_segment(seg_path, first, is_last=is_last)
            if decode_payloads:
                for frame in scan.frames:
                    decode_payload(frame.payload, str(seg_path), frame.offset, frame.lsn)
        except CorruptionError as exc:
            report.damage.append(Damage(str(exc), exc.path, exc.offset, exc.lsn))
            prev_last = None
            continue
        report.segments.append(
            SegmentReport(seg_path.name, first, scan.last_lsn, len(scan.frames),
                          seg_path.stat().st_size)
        )
        if scan.torn is not None:
            report.torn_tail = scan.torn
        prev_last = scan.last_lsn
    if progress is not None:
        progress(total, total)
    if segments and report.ok:
        first_lsn = segments[0][0]
        if first_lsn > applied + 1 and not gap_allowed(gaps, applied + 1, first_lsn - 1):
            report.damage.append(
                Damage(
                    f"the WAL begins at LSN {first_lsn} but the snapshot holds only up to LSN "
                    f"{applied}",
                    str(segments[0][1]), 0, applied + 1,
                )
            )
    return report
