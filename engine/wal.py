"""The write-ahead log: the segment writer and the segment scanner.

The writer appends frames to the active segment and rotates to a new one
when it is full; it is not thread-safe, and the store's group-commit leader is
its only caller. Before a new segment is created the old one is synced, so
every segment but the last is wholly durable: damage there is corruption,
never a torn tail.

Every frame records the highest LSN that was durable when it was written
(its *synced LSN*). That is how the scanner tells a torn tail from damage:
an unreadable frame at LSN n followed by an intact frame whose synced LSN is
at least n means n had been fsynced (and perhaps acknowledged) before, so the
damage is real corruption; if no later intact frame vouches for n, the bytes
from n on were never known durable, and they are cut as a torn tail.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import _failpoints, _fs
from .errors import CorruptionError, LSNGapError
from .layout import StoreLayout
from .record import (
    FRAME_MAGIC,
    FRAME_MAGIC_OFFSET,
    SEGMENT_HEADER_BYTES,
    Frame,
    FrameStatus,
    decode_frame,
    decode_segment_header,
    encode_frame,
    encode_segment_header,
)

__all__ = ["SegmentScan", "TornTail", "WALWriter", "scan_segment"]


@dataclass(frozen=True)
class TornTail:
    """What open cut from the end of the log: never-acknowledged bytes."""

    segment: str
    offset: int
    bytes_cut: int
    first_lost_lsn: int
    intact_frames_cut: int


@dataclass
class SegmentScan:
    path: Path
    first_lsn: int
    frames: list[Frame] = field(default_factory=list)
    end_offset: int = SEGMENT_HEADER_BYTES
    torn: TornTail | None = None
    #: the last intact LSN, counting frames checked but not kept
    last_lsn: int = 0

    def __post_init__(self) -> None:
        self.last_lsn = self.first_lsn - 1


def scan_segment(
    path: Path,
    first_lsn: int,
    *,
    is_last: bool,
    skip_below_lsn: int = 0,
    data: bytes | None = None,
) -> SegmentScan:
    """Read and check one segment.

    Frames with an LSN below ``skip_below_lsn`` are checked but not kept.
    Damage raises CorruptionError naming the file, offset and LSN; in the last
    segment, damage that no later intact frame vouches for is reported as a
    torn tail (``SegmentScan.torn``) and the frames before it are returned.
    """
    name = str(path)
    if data is None:
        data = path.read_bytes()
    scan = SegmentScan(path, first_lsn)
    if len(data) < SEGMENT_HEADER_BYTES and is_last:
        scan.end_offset = 0
        scan.torn = TornTail(name, 0, len(data), first_lsn, 0)
        return scan
    try:
        header_lsn = decode_segment_header(data, name)
    except CorruptionError as exc:
        if not is_last or type(exc) is not CorruptionError:
            raise
        _decide_tail(scan, data, 0, first_lsn, name)
        scan.end_offset = 0
        return scan
    if header_lsn != first_lsn:
        raise CorruptionError(
            f"segment header says it starts at LSN {header_lsn}, its name says {first_lsn}",
            path=name,
            offset=0,
        )
    offset = SEGMENT_HEADER_BYTES
    expected = first_lsn
    end = len(data)
    keep = scan.frames
    while offset < end:
        status, frame = decode_frame(data, offset, name)
        if frame is not None and frame.lsn == expected:
            if expected >= skip_below_lsn:
                keep.append(frame)
            offset += frame.size
            expected += 1
            continue
        if frame is not None:
            raise LSNGapError(
                f"expected LSN {expected}, found LSN {frame.lsn}", path=name, offset=offset,
                lsn=expected
            )
        if not is_last:
            what = "incomplete frame" if status == FrameStatus.INCOMPLETE else "checksum mismatch"
            raise CorruptionError(
                f"{what} in a sealed segment", path=name, offset=offset, lsn=expected
            )
        _decide_tail(scan, data, offset, expected, name)
        break
    scan.end_offset = offset
    scan.last_lsn = expected - 1
    return scan


def _decide_tail(scan: SegmentScan, data: bytes, offset: int, expected: int, name: str) -> None:
    """Torn tail, or corruption if a later intact frame says ``expected`` was durable."""
    cut = 0
    search = offset + 1
    while True:
        pos = data.find(FRAME_MAGIC, search)
        if pos < 0:
            break
        candidate = pos - FRAME_MAGIC_OFFSET
        search = pos + 1
        if candidate < offset:
            continue
        try:
            _status, frame = decode_frame(data, candidate, name)
        except CorruptionError:
            continue
        if frame is None or frame.lsn < expected:
            continue
        if frame.synced_lsn >= expected:
            raise CorruptionError(
                f"damaged record followed by intact records written after it was synced "
                f"(intact LSN {frame.lsn} at offset {candidate})",
                path=name,
                offset=offset,
                lsn=expected,
            )
        cut += 1
        search = candidate + frame.size
    scan.torn = TornTail(name, offset, len(data) - offset, expected, cut)


class WALWriter:
    """Appends frames to the active segment, rotating when it is full.

    Not thread-safe: one caller at a time (the group-commit leader). Each
    ``append`` either writes all its frames or raises; after a raise the
    caller must stop using the writer (the store poisons itself).
    """

    def __init__(
        self,
        layout: StoreLayout,
        *,
        segment_bytes: int,
        next_lsn: int,
        active: SegmentScan | None,
    ) -> None:
        self._layout = layout
        self._segment_bytes = segment_bytes
        self.next_lsn = next_lsn
        self.synced_lsn = next_lsn - 1
        self.fd: int | None = None
        self.segment_first_lsn = 0
        self.segment_size = 0
        self.bytes_written = 0
        if active is not None and active.end_offset >= SEGMENT_HEADER_BYTES:
            self.fd = _fs.open_append(active.path)
            self.segment_first_lsn = active.first_lsn
            self.segment_size = active.end_offset

    def append(self, records: Sequence[tuple[int, bytes]], sync: bool) -> None:
        """Write frames for ``(lsn, payload)`` records, in LSN order; fdatasync if ``sync``."""
        frames = []
        size = 0
        synced = self.synced_lsn
        for lsn, payload in records:
            if lsn != self.next_lsn:
                raise AssertionError(f"WAL append out of order: {lsn} != {self.next_lsn}")
            frame = encode_frame(lsn, synced, payload)
            frames.append(frame)
            size += len(frame)
            self.next_lsn += 1
        if self.fd is None or (
            self.segment_size > SEGMENT_HEADER_BYTES
            and self.segment_size + size > self._segment_bytes
        ):
            self._rotate(records[0][0])
            header = encode_segment_header(records[0][0])
            frames.insert(0, header)
            size += len(header)
        assert self.fd is not None
        if _failpoints.ACTIVE:
            _failpoints.hit("wal.before_write")
        _fs.writev(self.fd, frames)
        self.segment_size += size
        self.bytes_written += size
        if _failpoints.ACTIVE:
            _failpoints.hit("wal.after_write")
        if sync:
            _fs.fdatasync(self.fd)
            self.synced_lsn = self.next_lsn - 1
            if _failpoints.ACTIVE:
                _failpoints.hit("wal.after_sync")

    def sync(self) -> None:
        if self.fd is not None and self.synced_lsn < self.next_lsn - 1:
            _fs.fdatasync(self.fd)
        self.synced_lsn = self.next_lsn - 1

    def _rotate(self, first_lsn: int) -> None:
        """Seal the active segment (synced in full) and create the next one."""
        if self.fd is not None:
            self.sync()
            os.close(self.fd)
            self.fd = None
        path = self._layout.segment_path(first_lsn)
        self.fd = _fs.open_append(path)
        _fs.fsync_dir(self._layout.wal_dir)
        self.segment_first_lsn = first_lsn
        self.segment_size = 0

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
