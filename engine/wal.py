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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import _failpoints, _fs
from .errors import CorruptionError, LSNGapError
from .layout import StoreLayout
from .record import (
    _FRAME_HEADER,
    FRAME_HEADER_BYTES,
    FRAME_MAGIC,
    FRAME_MAGIC_OFFSET,
    FRAME_VERSION,
    MAX_PAYLOAD_BYTES,
    SEGMENT_HEADER_BYTES,
    Frame,
    FrameStatus,
    _xxh3,
    decode_frame,
    decode_segment_header,
    encode_frame,
    encode_segment_header,
)

__all__ = ["SegmentScan", "TornTail", "WALWriter", "all_zero", "iter_frames", "scan_segment"]


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
    #: where the intact frames end (the writer continues here); 0 if the
    #: segment has no valid header
    end_offset: int = SEGMENT_HEADER_BYTES
    torn: TornTail | None = None
    #: the last intact LSN, counting frames checked but not kept
    last_lsn: int = 0
    #: the file's size; above ``end_offset`` (with no torn tail) the rest is
    #: zero-filled space preallocated for frames not yet written
    file_bytes: int = 0

    def __post_init__(self) -> None:
        self.last_lsn = self.first_lsn - 1

    @property
    def empty_preallocated(self) -> bool:
        """A last segment of zeros only (at least a header long): preallocated and
        renamed into place, but never written to."""
        return self.end_offset == 0 and self.torn is None


_ZERO_CHUNK = bytes(1 << 20)
_FRAME_HEADER_UNPACK = _FRAME_HEADER.unpack_from


def all_zero(data: bytes, start: int) -> bool:
    """Whether ``data[start:]`` is all zero bytes (preallocated, never written)."""
    zero = memoryview(_ZERO_CHUNK)
    step = len(_ZERO_CHUNK)
    end = len(data)
    pos = start
    while pos < end:
        n = min(step, end - pos)
        if not data.startswith(zero[:n], pos):
            return False
        pos += n
    return True


def iter_frames(
    data: bytes, path: Path, first_lsn: int, scan: SegmentScan, *, is_last: bool
) -> Iterator[tuple[int, int, int]]:
    """Check a segment's frames in order, yielding ``(lsn, offset, size)`` of each intact one.

    The caller reads the payload at ``data[offset + FRAME_HEADER_BYTES :
    offset + size]``. When the iterator is exhausted, ``scan`` holds where the
    frames end, the last LSN and any torn tail. Damage raises CorruptionError
    naming the file, offset and LSN (possibly after frames before it were
    yielded); in the last segment, damage that no later intact frame vouches
    for is a torn tail. An all-zero rest of a segment is its clean end:
    space preallocated and never written, in any segment (a sealed one may
    have been left before it was full).
    """
    name = str(path)
    end = len(data)
    scan.file_bytes = end
    if end < SEGMENT_HEADER_BYTES and is_last:
        scan.end_offset = 0
        scan.torn = TornTail(name, 0, end, first_lsn, 0)
        return
    try:
        header_lsn = decode_segment_header(data, name, first_lsn)
    except CorruptionError as exc:
        if not is_last or type(exc) is not CorruptionError:
            raise
        scan.end_offset = 0
        if not all_zero(data, 0):
            _decide_tail(scan, data, 0, first_lsn, name)
        return
    if header_lsn != first_lsn:
        raise CorruptionError(
            f"segment header says it starts at LSN {header_lsn}, its name says {first_lsn}",
            path=name,
            offset=0,
            lsn=first_lsn,
        )
    offset = SEGMENT_HEADER_BYTES
    expected = first_lsn
    view = memoryview(data)
    unpack = _FRAME_HEADER_UNPACK
    xxh3 = _xxh3
    # The common case, inlined: an intact frame with the expected LSN.
    # Anything else leaves this loop for the exact rules below.
    while end - offset >= FRAME_HEADER_BYTES:
        checksum, magic, version, _flags, length, lsn, _synced = unpack(data, offset)
        stop = offset + FRAME_HEADER_BYTES + length
        if (
            lsn != expected
            or magic != FRAME_MAGIC
            or version != FRAME_VERSION
            or stop > end
            or length > MAX_PAYLOAD_BYTES
            or xxh3(view[offset + 8 : stop]) != checksum
        ):
            break
        yield lsn, offset, stop - offset
        offset = stop
        expected += 1
    while offset < end:
        status, frame = decode_frame(data, offset, name)
        if frame is not None and frame.lsn == expected:
            yield expected, offset, frame.size
            offset += frame.size
            expected += 1
            continue
        if frame is not None:
            raise LSNGapError(
                f"expected LSN {expected}, found LSN {frame.lsn}", path=name,
                offset=offset, lsn=expected
            )
        if all_zero(data, offset):
            break  # the clean end of a preallocated segment
        if not is_last:
            what = (
                "incomplete frame" if status == FrameStatus.INCOMPLETE
                else "checksum mismatch"
            )
            raise CorruptionError(
                f"{what} in a sealed segment", path=name, offset=offset, lsn=expected
            )
        _decide_tail(scan, data, offset, expected, name)
        break
    scan.end_offset = offset
    scan.last_lsn = expected - 1


def scan_segment(
    path: Path,
    first_lsn: int,
    *,
    is_last: bool,
    skip_below_lsn: int = 0,
    data: bytes | None = None,
) -> SegmentScan:
    """Read and check one segment, keeping its frames (see :func:`iter_frames`).

    Frames with an LSN below ``skip_below_lsn`` are checked but not kept.
    Damage raises CorruptionError naming the file, offset and LSN; in the last
    segment, damage that no later intact frame vouches for is reported as a
    torn tail (``SegmentScan.torn``) and the frames before it are returned.
    """
    if data is None:
        data = path.read_bytes()
    scan = SegmentScan(path, first_lsn)
    keep = scan.frames
    for lsn, offset, size in iter_frames(data, path, first_lsn, scan, is_last=is_last):
        if lsn >= skip_below_lsn:
            payload = data[offset + FRAME_HEADER_BYTES : offset + size]
            _checksum, _magic, _version, _flags, _length, _lsn, synced = _FRAME_HEADER_UNPACK(
                data, offset
            )
            keep.append(Frame(lsn, synced, offset, size, payload))
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
        next_lsn = self.next_lsn
        for lsn, payload in records:
            if lsn != next_lsn:
                raise AssertionError(f"WAL append out of order: {lsn} != {next_lsn}")
            frame = encode_frame(lsn, synced, payload)
            frames.append(frame)
            size += len(frame)
            next_lsn += 1
        if self.fd is None or (
            self.segment_size > SEGMENT_HEADER_BYTES
            and self.segment_size + size > self._segment_bytes
        ):
            # before next_lsn moves: sealing syncs (and counts as synced) only
            # the records the old segment holds, not the ones about to be written
            self._rotate(records[0][0])
            header = encode_segment_header(records[0][0])
            frames.insert(0, header)
            size += len(header)
        self.next_lsn = next_lsn
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
