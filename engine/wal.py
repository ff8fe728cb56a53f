"""The write-ahead log: the segment writer and the segment scanner.

(Over 500 lines: the writer, its segment preparer and the scanner share one segment
layout and one rule for a torn tail, which FORMAT.md states once.)

The writer appends frames to the active segment and rotates to a new one
when it is full; it is not thread-safe, and the store's group-commit leader is
its only caller. Before a new segment is named the old one is synced, so
every segment but the last is wholly durable: damage there is corruption,
never a torn tail. Segment files are preallocated (zero-filled and synced
ahead of time by a background thread) and overwritten in place, so a
commit's fdatasync flushes data, not file metadata; the scanner takes an
all-zero rest of a segment for its clean end.

Every frame records the highest LSN that was durable when it was written
(its *synced LSN*). That is how the scanner tells a torn tail from damage:
an unreadable frame at LSN n followed by an intact frame whose synced LSN is
at least n means n had been fsynced (and perhaps acknowledged) before, so the
damage is real corruption; if no later intact frame vouches for n, the bytes
from n on were never known durable, and they are cut as a torn tail.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
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
    SPLIT_VALUE_BYTES,
    Frame,
    FrameStatus,
    _xxh3,
    decode_frame,
    decode_segment_header,
    encode_frame,
    encode_frame_parts,
    encode_segment_header,
)

log = logging.getLogger("walsync.wal")

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
                f"{what} in a segment that was synced in full (sealed, or the last one "
                "of a cleanly closed store)", path=name, offset=offset, lsn=expected
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


#: the first segment file prepared after open is this large (or segment_bytes
#: if that is smaller); each one filled by small writes doubles the next, up
#: to segment_bytes, so a quiet store keeps small files
_FIRST_PREPARED_BYTES = 1 << 20


class _SegmentPreparer:
    """Makes the next segment file ahead of time, on a thread of its own.

    The file (``layout.prepared_segment``) is zero-filled to its full size and
    fsynced before it is offered, so frames written into it later change no
    file metadata and their fdatasync flushes data only. The writer takes it
    by renaming it to the next segment's name. One file at a time. A failed
    write or sync (a full disk, a failing one) goes to ``on_failure`` (the
    store poisons itself: the disk under its log failed, whichever thread saw
    it) and the file is removed; a rotation meanwhile creates a plain segment.
    """

    def __init__(self, layout: StoreLayout,
                 on_failure: Callable[[BaseException, str], None] | None = None) -> None:
        self._path = layout.prepared_segment
        self._on_failure = on_failure
        self._cond = threading.Condition(threading.Lock())
        self._wanted = 0  # bytes asked for, not started yet
        self._ready = 0  # bytes of the file that is ready to take
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def request(self, size: int) -> None:
        """Start preparing a file of ``size`` bytes, unless one is ready or under way."""
        with self._cond:
            if self._closed or self._ready or self._busy or self._wanted:
                return
            self._wanted = size
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="walsync-prepare-segment", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def ready_bytes(self) -> int:
        return self._ready

    def take(self, dest: Path, *, wait: bool) -> int:
        """Rename the prepared file to ``dest`` and return its size; 0 (and nothing
        renamed) if none is ready, after waiting for one under way if ``wait``."""
        with self._cond:
            while wait and not self._ready and (self._busy or self._wanted):
                self._cond.wait()
            size = self._ready
            if not size:
                return 0
            self._ready = 0
            _fs.rename(self._path, dest)
            return size

    def close(self) -> None:
        """Stop the thread and remove a prepared file nobody took."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._ready = 0
        _remove_quietly(self._path)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._wanted and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                size, self._wanted = self._wanted, 0
                self._busy = True
            done = False
            try:
                fd = _fs.open_segment(self._path, create=True)
                try:
                    done = _fs.zero_fill(fd, size, lambda: self._closed)
                finally:
                    os.close(fd)
            except Exception as exc:  # noqa: BLE001 - reported to the store
                log.warning("could not prepare the next WAL segment %s: %s", self._path, exc)
                if self._on_failure is not None:
                    self._on_failure(exc, f"preparing the next WAL segment {self._path}")
            if not done:
                _remove_quietly(self._path)
            with self._cond:
                self._busy = False
                if done and not self._closed:
                    self._ready = size
                self._cond.notify_all()


def _remove_quietly(path: Path) -> None:
    try:
        _fs.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)


class WALWriter:
    """Writes frames into the active segment, rotating when it is full.

    Segments are preallocated (see :class:`_SegmentPreparer`): frames overwrite
    zero-filled, synced space in place (positioned writes, no O_APPEND), so a
    commit's fdatasync need not update file metadata. A batch that does not
    fit in the zero-filled space extends the file (correct, only slower); when
    a prepared file is ready, such a batch starts it instead, ahead of
    ``segment_bytes``.

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
        preallocate: bool = True,
        on_failure: Callable[[BaseException, str], None] | None = None,
    ) -> None:
        self._layout = layout
        self._segment_bytes = segment_bytes
        self.next_lsn = next_lsn
        self.synced_lsn = next_lsn - 1
        self.fd: int | None = None
        self.segment_first_lsn = 0
        #: where the next frame goes in the active segment
        self.segment_size = 0
        #: the active segment's bytes that were zero-filled and synced before use
        self.segment_allocated = 0
        self.bytes_written = 0
        #: called between a batch's write and its fdatasync: the commit pipeline
        #: starts its applier there, to run while this thread waits for the disk
        self.before_sync: Callable[[], None] | None = None
        self._prepare_bytes = min(segment_bytes, _FIRST_PREPARED_BYTES)
        # a file prepared before a crash: its zeros may not all have been synced
        _remove_quietly(layout.prepared_segment)
        self._preparer = _SegmentPreparer(layout, on_failure) if preallocate else None
        if active is not None and active.end_offset >= SEGMENT_HEADER_BYTES:
            fd = _fs.open_segment(active.path, create=False)
            self.fd = fd
            os.lseek(fd, active.end_offset, os.SEEK_SET)
            self.segment_first_lsn = active.first_lsn
            self.segment_size = active.end_offset
            # the zeros after the frames were synced when the file was prepared
            # (a cut torn tail was truncated away)
            self.segment_allocated = os.fstat(fd).st_size
        if self._preparer is not None:
            self._preparer.request(self._prepare_bytes)

    def append(self, records: Sequence[tuple[int, bytes | list[bytes]]], sync: bool) -> None:
        """Write frames for ``(lsn, payload)`` records, in LSN order; fdatasync if ``sync``.
        ``before_sync`` is called once the frames are written, before the fdatasync.

        A payload may come in parts (a large value kept apart, see
        ``record.encode_payload_parts``): they are hashed and written where
        they are, never joined. So is a large payload.
        """
        frames: list[bytes] = []
        size = 0
        synced = self.synced_lsn
        next_lsn = self.next_lsn
        for lsn, payload in records:
            if lsn != next_lsn:
                raise AssertionError(f"WAL append out of order: {lsn} != {next_lsn}")
            if isinstance(payload, bytes) and len(payload) < SPLIT_VALUE_BYTES:
                frame = encode_frame(lsn, synced, payload)
                frames.append(frame)
                size += len(frame)
            else:
                parts = encode_frame_parts(
                    lsn, synced, [payload] if isinstance(payload, bytes) else payload
                )
                frames.extend(parts)
                size += sum(len(p) for p in parts)
            next_lsn += 1
        # before next_lsn moves: sealing syncs (and counts as synced) only the
        # records the old segment holds, not the ones about to be written
        if self.fd is None or (
            self.segment_size > SEGMENT_HEADER_BYTES
            and self.segment_size + size > self._segment_bytes
        ):
            self._rotate(records[0][0], size, must=True)
        elif self.segment_size + size > self.segment_allocated and self._preparer is not None:
            ready = self._preparer.ready_bytes()
            if ready >= SEGMENT_HEADER_BYTES + size and self.segment_size > SEGMENT_HEADER_BYTES:
                self._rotate(records[0][0], size, must=False)
        if self.segment_size == 0:
            header = encode_segment_header(records[0][0])
            frames.insert(0, header)
            size += len(header)
        self.next_lsn = next_lsn
        assert self.fd is not None
        if _failpoints.ACTIVE:
            _failpoints.hit("wal.before_write")
        written = _fs.writev(self.fd, frames)
        if written != size:
            # never counted as written: the next frame would land after a hole
            raise OSError(errno.EIO, f"short write: {written} of {size} bytes")
        self.segment_size += size
        self.bytes_written += size
        if _failpoints.ACTIVE:
            _failpoints.hit("wal.after_write")
        before_sync = self.before_sync
        if before_sync is not None:
            before_sync()
        if sync:
            _fs.fdatasync(self.fd)
            self.synced_lsn = self.next_lsn - 1
            if _failpoints.ACTIVE:
                _failpoints.hit("wal.after_sync")

    def sync(self) -> None:
        if self.fd is not None and self.synced_lsn < self.next_lsn - 1:
            _fs.fdatasync(self.fd)
        self.synced_lsn = self.next_lsn - 1

    def _rotate(self, first_lsn: int, size: int, *, must: bool) -> None:
        """Seal the active segment (synced in full), then name the next one.

        The next segment is the prepared file when there is one (waited for if
        it is under way and the rotation cannot be put off), else a new empty
        file; either way the directory is synced before a frame goes in.
        """
        if self.fd is not None:
            if 0 < size < self.segment_allocated // 2 <= self.segment_size:
                # small writes filled the preallocated space: prepare more next time
                self._prepare_bytes = min(self._segment_bytes, 2 * self._prepare_bytes)
            self._trim()
            self.sync()
            os.close(self.fd)
            self.fd = None
        path = self._layout.segment_path(first_lsn)
        taken = 0
        if self._preparer is not None:
            taken = self._preparer.take(path, wait=must)
        self.fd = _fs.open_segment(path, create=not taken)
        _fs.fsync_dir(self._layout.wal_dir)
        self.segment_first_lsn = first_lsn
        self.segment_size = 0
        self.segment_allocated = taken
        if self._preparer is not None:
            self._preparer.request(self._prepare_bytes)

    def _trim(self) -> None:
        """Cut the unused zero-filled end off the active segment, synced: a sealed
        segment (or the last one after a clean close) ends with its last frame."""
        if self.fd is not None and self.segment_allocated > self.segment_size:
            _fs.truncate(self.fd, self.segment_size)
            _fs.fdatasync(self.fd)
            self.synced_lsn = self.next_lsn - 1
            self.segment_allocated = self.segment_size

    def close(self, *, trim: bool = False) -> None:
        """Close the active segment (first, if ``trim``, cut its unused end); stop
        preparing (a prepared file is removed)."""
        if self.fd is not None:
            if trim:
                self._trim()
            os.close(self.fd)
            self.fd = None
        if self._preparer is not None:
            self._preparer.close()
