"""`repair`: keep what precedes the first damage, move the rest aside.

Nothing is deleted: the damaged segment is copied whole, and every later
segment moved, into ``quarantine/<UTC time>/``. The damaged segment is then
cut just before the damage. The LSNs from the damage to the highest one seen
in the quarantined bytes (or held by the snapshot) are recorded in the STORE
file as a known hole and are never handed out again, because the sync server
may already hold records under them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from . import _fs
from .errors import (
    CorruptionError,
    FormatVersionError,
    StoreNotFoundError,
    error_from_os,
)
from .layout import StoreLayout
from .lock import WriterLock
from .record import (
    FRAME_MAGIC,
    FRAME_MAGIC_OFFSET,
    SEGMENT_HEADER_BYTES,
    decode_frame,
    decode_payload,
)
from .replay import gap_allowed
from .snapshot import SnapshotStore
from .store import read_store_file, write_store_file
from .wal import scan_segment

__all__ = ["RepairReport", "repair"]


@dataclass(frozen=True)
class RepairReport:
    damaged: bool
    message: str = ""
    segment: str | None = None
    offset: int | None = None
    first_lost_lsn: int | None = None
    last_lost_lsn: int | None = None
    #: lost LSNs the snapshot did not hold either: their effects are gone
    records_lost_from_state: int = 0
    quarantine: str | None = None
    moved: list[str] = field(default_factory=list)


def repair(path: str | Path, *, lock_timeout_seconds: float = 0.0) -> RepairReport:
    layout = StoreLayout(path)
    if not layout.store_file.exists():
        raise StoreNotFoundError(f"no walsync store at {path}")
    lock = WriterLock(layout.lock_file, str(path))
    try:
        lock.acquire(lock_timeout_seconds)
        try:
            return _repair_locked(layout)
        finally:
            lock.release()
    except OSError as exc:
        # each step leaves the store openable or repairable again (see above)
        raise error_from_os(exc, f"repairing store {path}") from exc


def _find_damage(
    layout: StoreLayout, gaps: list[tuple[int, int]]
) -> tuple[int, int, int, CorruptionError] | None:
    """(segment index, offset, first bad LSN, error) of the first damage, or None."""
    segments = layout.list_segments()
    prev_last: int | None = None
    for i, (first, seg_path) in enumerate(segments):
        if prev_last is not None and first != prev_last + 1 and not gap_allowed(
            gaps, prev_last + 1, first - 1
        ):
            return i, 0, prev_last + 1, CorruptionError(
                f"LSN gap before {seg_path.name}", path=str(seg_path), offset=0
            )
        try:
            scan = scan_segment(seg_path, first, is_last=i == len(segments) - 1)
            for frame in scan.frames:
                decode_payload(frame.payload, str(seg_path), frame.offset, frame.lsn)
        except FormatVersionError:
            raise
        except CorruptionError as exc:
            offset = exc.offset if exc.offset is not None else 0
            lsn = exc.lsn if exc.lsn is not None else first
            return i, offset, lsn, exc
        prev_last = scan.last_lsn
    return None


def _max_intact_lsn(data: bytes) -> int:
    best = 0
    pos = data.find(FRAME_MAGIC)
    while pos >= 0:
        candidate = pos - FRAME_MAGIC_OFFSET
        if candidate >= 0:
            try:
                _status, frame = decode_frame(data, candidate)
            except CorruptionError:
                frame = None
            if frame is not None:
                best = max(best, frame.lsn)
        pos = data.find(FRAME_MAGIC, pos + 1)
    return best


def _repair_locked(layout: StoreLayout) -> RepairReport:
    meta = read_store_file(layout.store_file)
    gaps = [(int(a), int(b)) for a, b in meta.get("lsn_gaps", [])]
    found = _find_damage(layout, gaps)
    if found is None:
        return RepairReport(False, "no damage found; a torn tail, if any, is cut on open")
    index, offset, first_lost, error = found
    segments = layout.list_segments()
    max_seen = first_lost - 1
    for i in range(index, len(segments)):
        max_seen = max(max_seen, _max_intact_lsn(segments[i][1].read_bytes()))
    applied = 0
    if (layout.snapshot_dir / "data.mdb").exists():
        snapshot = SnapshotStore(layout.snapshot_dir, map_size_bytes=1 << 20)
        try:
            applied = snapshot.applied_lsn()
        finally:
            snapshot.close()
    last_lost = max(max_seen, applied, first_lost)
    lost_from_state = max(0, max_seen - max(applied, first_lost - 1))
    # Reserve the lost LSNs before anything moves, so that a repair stopped half
    # way never lets them be handed out again. The hole itself is recorded only
    # once the segments are gone: recorded before, it would let open replay the
    # intact segments after a missing one. (An open in between records the hole
    # by itself, as the LSNs it skips for min_next_lsn.)
    meta["min_next_lsn"] = max(int(meta.get("min_next_lsn", 1)), last_lost + 1)
    write_store_file(layout.store_file, meta)

    quarantine = layout.new_quarantine_dir()
    moved: list[str] = []
    for i in range(index, len(segments)):
        seg_path = segments[i][1]
        target = quarantine / seg_path.name
        if i == index and offset >= SEGMENT_HEADER_BYTES:
            _fs.copy_file(seg_path, target)
            fd = _fs.open_segment(seg_path, create=False)
            try:
                _fs.truncate(fd, offset)
                _fs.fsync(fd)
            finally:
                os.close(fd)
        else:
            _fs.rename(seg_path, target)
        moved.append(seg_path.name)
    _fs.fsync_dir(quarantine)
    _fs.fsync_dir(layout.wal_dir)

    if not gap_allowed(gaps, first_lost, last_lost):
        gaps.append((first_lost, last_lost))
    meta["lsn_gaps"] = [list(g) for g in gaps]
    write_store_file(layout.store_file, meta)
    return RepairReport(
        True,
        str(error),
        segments[index][1].name,
        offset,
        first_lost,
        max_seen if max_seen >= first_lost else None,
        lost_from_state,
        str(quarantine),
        moved,
    )
