"""Reading committed records back out of the WAL, in LSN order, for sync.

The replicator ships what this yields. It reads segment files directly (no
lock with the writer) and is told the highest LSN that is both durable and
applied; it never reads past it, so a frame still being written is never
seen. A reader remembers where it stopped, so shipping a long log reads each
byte once. Records below the oldest kept segment are gone (the retention
floor exists to prevent that): asking for them raises LSNGapError.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CorruptionError, LSNGapError
from .layout import StoreLayout
from .record import (
    FRAME_HEADER_BYTES,
    KIND_LOCAL,
    SEGMENT_HEADER_BYTES,
    FrameStatus,
    decode_frame,
    decode_payload,
)

__all__ = ["CommittedRecord", "WALReader"]

_READ_BYTES = 4 * 1024 * 1024
#: bytes read per record asked for, when fewer records are asked for than fill
#: _READ_BYTES: a reader asked for a few records at a time does not copy megabytes
#: each time (a frame longer than the read is read on its own, below)
_READ_BYTES_PER_RECORD = 4096


@dataclass(frozen=True, slots=True)
class CommittedRecord:
    lsn: int
    kind: int
    hlc: int
    #: ``[key, entry]`` pairs: the snapshot entry each key got (see FORMAT.md)
    ops: list[Any]
    size_bytes: int

    @property
    def local(self) -> bool:
        """Written on this node (shipped); merge records came from others (never shipped)."""
        return self.kind == KIND_LOCAL


class WALReader:
    """Reads records after a given LSN; not thread-safe (one replicator owns one)."""

    def __init__(self, layout: StoreLayout) -> None:
        self._layout = layout
        self._path: Path | None = None
        self._offset = 0
        self._next_lsn = 0
        self._segment_first = 0

    def read(self, after_lsn: int, upto_lsn: int, max_records: int,
             max_bytes: int = 16 * 1024 * 1024) -> list[CommittedRecord]:
        """Up to ``max_records`` records with after_lsn < LSN <= upto_lsn, in order."""
        out: list[CommittedRecord] = []
        if upto_lsn <= after_lsn:
            return out
        if self._path is None or self._next_lsn != after_lsn + 1:
            self._seek(after_lsn)
        size = 0
        while len(out) < max_records and size < max_bytes and self._next_lsn <= upto_lsn:
            assert self._path is not None
            got = self._read_some(upto_lsn, max_records - len(out), out)
            size += got
            if got == 0 and not self._advance_segment():
                break
        return out

    def oldest_lsn(self) -> int | None:
        """The first LSN still in the WAL (None when no segment is left)."""
        segments = self._layout.list_segments()
        return segments[0][0] if segments else None

    def position_bytes(self) -> int:
        """WAL bytes before the reader's position (0 before the first read)."""
        if self._path is None:
            return 0
        total = 0
        for first, path in self._layout.list_segments():
            if first >= self._segment_first:
                break
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                continue
        return total + self._offset

    def _seek(self, after_lsn: int) -> None:
        segments = self._layout.list_segments()
        chosen = None
        for first, path in segments:
            if first <= after_lsn + 1:
                chosen = (first, path)
        if chosen is None:
            oldest = segments[0][0] if segments else None
            raise LSNGapError(
                f"records from LSN {after_lsn + 1} are no longer in the WAL (oldest kept "
                f"segment starts at {oldest}); they were removed before they were shipped",
                lsn=after_lsn + 1,
            )
        self._segment_first, self._path = chosen
        self._offset = SEGMENT_HEADER_BYTES
        self._next_lsn = self._segment_first
        skipped: list[CommittedRecord] = []
        while self._next_lsn <= after_lsn:
            skipped.clear()
            if (self._read_some(after_lsn, 1 << 30, skipped, keep=False) == 0
                    and not self._advance_segment()):
                break

    def _advance_segment(self) -> bool:
        for first, path in self._layout.list_segments():
            if first > self._segment_first:
                if first != self._next_lsn:
                    return False
                self._segment_first, self._path = first, path
                self._offset = SEGMENT_HEADER_BYTES
                return True
        return False

    def _read_some(self, upto_lsn: int, limit: int, out: list[CommittedRecord],
                   keep: bool = True) -> int:
        """Decode frames from the current position; the bytes consumed."""
        assert self._path is not None
        name = str(self._path)
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            data = os.pread(fd, min(_READ_BYTES, limit * _READ_BYTES_PER_RECORD), self._offset)
            pos = 0
            while pos < len(data) and self._next_lsn <= upto_lsn and limit > 0:
                status, frame = decode_frame(data, pos, name)
                if status == FrameStatus.INCOMPLETE and frame is None and pos == 0:
                    # a frame larger than one read: read exactly it
                    data = os.pread(fd, self._frame_size(data), self._offset)
                    status, frame = decode_frame(data, 0, name)
                if frame is None:
                    break
                if frame.lsn != self._next_lsn:
                    raise CorruptionError(
                        f"expected LSN {self._next_lsn} while reading for sync, found "
                        f"{frame.lsn}", path=name, offset=self._offset + pos)
                if keep:
                    kind, hlc, ops = decode_payload(frame.payload, name, frame.offset, frame.lsn)
                    out.append(CommittedRecord(frame.lsn, kind, hlc, ops, frame.size))
                pos += frame.size
                self._next_lsn += 1
                limit -= 1
        finally:
            os.close(fd)
        self._offset += pos
        return pos

    @staticmethod
    def _frame_size(head: bytes) -> int:
        length = int.from_bytes(head[12:16], "little")
        return FRAME_HEADER_BYTES + length
