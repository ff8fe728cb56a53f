"""Every path and file name of a store directory, in one place.

    <store>/
      STORE                 identity and format (JSON, written atomically)
      LOCK                  the single-writer lock; holds the writer's pid
      wal/<16 hex>.wal      WAL segments, named by their first LSN
      wal/prepared.tmp      the next segment, zero-filled ahead of time (not a segment yet)
      OPEN                  present while a writer has the store open (its boot id)
      snapshot/             the LMDB environment (data.mdb, lock.mdb)
      snapshot-base/        a synced copy of the snapshot made at the last checkpoint
                            (data.mdb, BASE: the LSN it holds)
      quarantine/<time>/    what `repair` moved aside; never deleted by walsync

Segment names are fixed-width lower-case hex so that a plain listing sorts in
log order.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from . import _fs

__all__ = ["StoreLayout", "parse_segment_name", "segment_name"]

_SEGMENT_RE = re.compile(r"^([0-9a-f]{16})\.wal$")


def segment_name(first_lsn: int) -> str:
    return f"{first_lsn:016x}.wal"


def parse_segment_name(name: str) -> int | None:
    """The first LSN a segment file name encodes, or None if it is not one."""
    m = _SEGMENT_RE.match(name)
    return int(m.group(1), 16) if m else None


class StoreLayout:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.store_file = self.root / "STORE"
        self.lock_file = self.root / "LOCK"
        self.wal_dir = self.root / "wal"
        self.snapshot_dir = self.root / "snapshot"
        #: present while a writer has the store open; left behind by a crash
        self.open_marker = self.root / "OPEN"
        self.base_dir = self.root / "snapshot-base"
        self.quarantine_dir = self.root / "quarantine"
        #: the next segment file, zero-filled and synced ahead of time; it
        #: becomes a segment when it is renamed to one (never listed as one)
        self.prepared_segment = self.wal_dir / "prepared.tmp"

    def closed_cleanly(self) -> bool:
        """No writer died with the store open: its WAL was synced to the end,
        so damage in the last segment is corruption, never a torn tail."""
        return not self.open_marker.exists()

    def segment_path(self, first_lsn: int) -> Path:
        return self.wal_dir / segment_name(first_lsn)

    def list_segments(self) -> list[tuple[int, Path]]:
        """(first LSN, path) of every segment, in log order."""
        if not self.wal_dir.is_dir():
            return []
        found = []
        for name in os.listdir(self.wal_dir):
            lsn = parse_segment_name(name)
            if lsn is not None:
                found.append((lsn, self.wal_dir / name))
        found.sort()
        return found

    def new_quarantine_dir(self) -> Path:
        """``quarantine/<UTC time>/``, or ``<UTC time>-<n>`` if that exists (two
        repairs in one second): an earlier repair's files are never mixed with these."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        _fs.make_dir(self.quarantine_dir)
        quarantine = self.quarantine_dir / stamp
        n = 1
        while not _fs.make_dir(quarantine):
            n += 1
            quarantine = self.quarantine_dir / f"{stamp}-{n}"
        return quarantine
