"""Recovery on open: bring the snapshot up to the end of the WAL.

Why this is safe to run any number of times, and after a crash in itself:
the snapshot stores its applied LSN in the same LMDB transaction as the data,
so replay starts from exactly the first record the snapshot lacks, and a
record applied twice is impossible. Local records carry the snapshot entry
they produce; merge records are deterministic given the state before them,
and that state is the same on every replay because records apply in LSN
order.

What is checked: every segment from the one holding ``applied + 1`` to the
end — frame checksums, LSN continuity inside and across segments (holes that
`repair` recorded in the STORE file are allowed). Older segments are left to
`verify`, so opening stays fast.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from . import _fs
from .errors import LSNGapError
from .layout import StoreLayout
from .record import decode_payload
from .snapshot import AppliedRecord, SnapshotStore
from .wal import SegmentScan, TornTail, scan_segment

__all__ = ["RecoveryReport", "recover"]

log = logging.getLogger("walsync.replay")

#: records applied per LMDB transaction during replay
_APPLY_CHUNK = 8192


@dataclass(frozen=True)
class RecoveryReport:
    """What open found and did. A torn tail is reported here, not raised."""

    applied_lsn_before: int
    replayed_records: int
    last_lsn: int
    torn_tail: TornTail | None
    segments_read: int
    seconds: float
    #: LSNs the snapshot holds but the WAL lost (only after a power loss with
    #: durability 'none'): recorded as a known hole so the log stays checkable
    wal_hole: tuple[int, int] | None = None

    @property
    def records_per_second(self) -> float:
        return self.replayed_records / self.seconds if self.seconds > 0 else 0.0


def gap_allowed(gaps: list[tuple[int, int]], first_missing: int, last_missing: int) -> bool:
    return any(lo <= first_missing and last_missing <= hi for lo, hi in gaps)


def recover(
    layout: StoreLayout,
    snapshot: SnapshotStore,
    gaps: list[tuple[int, int]],
    min_next_lsn: int = 1,
) -> tuple[RecoveryReport, SegmentScan | None, int]:
    """Replay; return the report, the scan of the segment to append to, and the next LSN.

    ``min_next_lsn`` (set by repair) keeps LSNs that were lost from the log
    from ever being handed out again.
    """
    started = time.perf_counter()
    applied = snapshot.applied_lsn()
    segments = layout.list_segments()
    if not segments:
        next_lsn = max(applied + 1, min_next_lsn)
        report = RecoveryReport(applied, 0, next_lsn - 1, None, 0, time.perf_counter() - started)
        return report, None, next_lsn

    start = 0
    for i, (first, _path) in enumerate(segments):
        if first <= applied + 1:
            start = i
    first_needed = segments[start][0]
    if first_needed > applied + 1 and not gap_allowed(gaps, applied + 1, first_needed - 1):
        raise LSNGapError(
            f"the WAL begins at LSN {first_needed} but the snapshot holds only up to LSN "
            f"{applied}: records {applied + 1}..{first_needed - 1} are missing",
            path=str(segments[start][1]),
            lsn=applied + 1,
        )

    replayed = 0
    prev_last: int | None = None
    scan: SegmentScan | None = None
    for i in range(start, len(segments)):
        first, path = segments[i]
        is_last = i == len(segments) - 1
        if prev_last is not None and first != prev_last + 1 and not gap_allowed(
            gaps, prev_last + 1, first - 1
        ):
            raise LSNGapError(
                f"segment starts at LSN {first} but the previous one ends at LSN {prev_last}",
                path=str(path),
                offset=0,
                lsn=prev_last + 1,
            )
        scan = scan_segment(path, first, is_last=is_last, skip_below_lsn=applied + 1)
        chunk: list[AppliedRecord] = []
        for frame in scan.frames:
            kind, hlc, ops = decode_payload(frame.payload, str(path), frame.offset, frame.lsn)
            chunk.append((frame.lsn, kind, hlc, ops))
            if len(chunk) >= _APPLY_CHUNK:
                snapshot.apply(chunk)
                replayed += len(chunk)
                chunk = []
        if chunk:
            snapshot.apply(chunk)
            replayed += len(chunk)
        prev_last = scan.last_lsn
        scan.frames = []

    assert scan is not None
    assert prev_last is not None
    if scan.torn is not None:
        _cut_tail(layout, scan)
    wal_last = prev_last
    hole = None
    active: SegmentScan | None = scan if scan.end_offset > 0 else None
    applied_now = snapshot.applied_lsn()
    if wal_last < applied_now:
        # The snapshot reached disk with records whose WAL bytes did not.
        hole = (wal_last + 1, applied_now)
        active = None
        log.warning("WAL lost LSNs %d..%d that the snapshot holds", hole[0], hole[1])
    next_lsn = max(wal_last + 1, applied_now + 1, min_next_lsn)
    if next_lsn != wal_last + 1:
        active = None  # the next record starts a new segment after the hole
    report = RecoveryReport(
        applied, replayed, next_lsn - 1, scan.torn, len(segments) - start,
        time.perf_counter() - started, hole,
    )
    return report, active, next_lsn


def _cut_tail(layout: StoreLayout, scan: SegmentScan) -> None:
    torn = scan.torn
    assert torn is not None
    log.warning(
        "cut a torn tail of %d bytes from %s at offset %d (first lost LSN %d, never acknowledged)",
        torn.bytes_cut, torn.segment, torn.offset, torn.first_lost_lsn,
    )
    if torn.offset == 0:
        _fs.unlink(scan.path)
        _fs.fsync_dir(layout.wal_dir)
        return
    fd = os.open(scan.path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        _fs.truncate(fd, torn.offset)
        _fs.fsync(fd)
    finally:
        os.close(fd)
