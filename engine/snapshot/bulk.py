"""Whole-file work on a snapshot: its format check and one-time sealing, the base
copy, compaction, and a repair's load.

Each runs rarely (an open, a checkpoint's base, ``compact``, ``repair``) and
touches every page, so none of it is on a commit's path; it works on a
SnapshotStore's environment directly, under the store's gate where a commit or
read could meet it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb

from .. import _fs
from ..errors import CorruptionError, FormatVersionError
from ..record import decode_entry
from .env import os_error
from .seal import (
    APPLIED_LSN_NAME,
    FORMAT_NAME,
    SNAPSHOT_FORMAT_VERSION,
    holds_siblings,
    seal,
    unseal,
)

if TYPE_CHECKING:
    from .snapshot_store import SnapshotStore

__all__ = [
    "EntryWriter",
    "check_format",
    "compact",
    "compaction_survivor",
    "copy_to",
    "finish_compaction",
    "load",
    "write_raw",
]

log = logging.getLogger("walsync.snapshot")

#: a repair's load commits a transaction at about this many bytes
_LOAD_BYTES = 32 << 20


def check_format(snap: SnapshotStore) -> None:
    """Refuse a snapshot of another format; a writer seals a format-1 snapshot."""
    try:
        with snap.env.begin(buffers=False) as txn:
            raw = txn.get(FORMAT_NAME, db=snap.meta_db)
            empty = (int(txn.stat(snap.data_db)["entries"]) == 0
                     and int(txn.stat(snap.meta_db)["entries"]) == 0)
    except lmdb.Error as exc:
        raise snap.read_error(exc, FORMAT_NAME) from exc
    if raw is not None:
        value = unseal(FORMAT_NAME, raw)
        if value is None:
            raise snap.damaged(FORMAT_NAME, "meta", "fails its checksum")
        version = int.from_bytes(value, "little")
        if version != SNAPSHOT_FORMAT_VERSION:
            raise FormatVersionError(
                f"snapshot format version {version} is not supported by this walsync, "
                f"which reads version {SNAPSHOT_FORMAT_VERSION}", path=snap.data_file)
        return
    if snap.readonly:
        if empty:
            return  # a new environment, its writer about to mark it
        raise FormatVersionError(
            "snapshot format version 1 (entries without checksums) is not read by this "
            f"walsync, which reads version {SNAPSHOT_FORMAT_VERSION}", path=snap.data_file,
            hint="open the store for writing once: the writer adds the checksums "
            "(a one-time rewrite of the snapshot)")
    snap.write("format upgrade", lambda: _seal_format_1(snap, empty))


def _seal_format_1(snap: SnapshotStore, empty: bool) -> None:
    """Seal every value of a format-1 snapshot and mark it format 2, in one
    transaction: a crash before its commit leaves format 1, sealed again next time.

    An entry is sealed only if it decodes as an entry (a format-1 file had no
    other check), and a value that is sealed already means the format entry
    itself was lost: neither is sealed over, both are damage.
    """
    sealed = 0
    with snap.env.begin(write=True, db=snap.data_db) as txn:
        try:
            for db, table in ((snap.data_db, "data"), (snap.meta_db, "meta")):
                if empty:
                    break
                cur = txn.cursor(db=db)
                for raw_key, raw in cur:
                    key, value = bytes(raw_key), bytes(raw)
                    if unseal(key, value) is not None:
                        raise snap.damaged(
                            key, table, "carries a checksum but the snapshot has no "
                            "format entry: that entry is damaged")
                    if table == "data":
                        try:
                            decode_entry(value)
                        except CorruptionError as exc:
                            raise snap.damaged(
                                key, table, f"(format 1, written without a checksum) "
                                f"does not decode: {exc}") from None
                    cur.put(key, seal(key, value))
                    sealed += 1
            version = SNAPSHOT_FORMAT_VERSION.to_bytes(4, "little")
            txn.put(FORMAT_NAME, seal(FORMAT_NAME, version), db=snap.meta_db)
        except lmdb.MapFullError:
            raise
        except lmdb.Error as exc:
            raise snap.read_error(exc, None) from exc
    if sealed:
        log.info("snapshot %s: sealed %d values (format 1 to %d)", snap.path, sealed,
                 SNAPSHOT_FORMAT_VERSION)


def copy_to(snap: SnapshotStore, directory: Path) -> int:
    """Write a compact copy of the snapshot as one read transaction sees it
    into the empty ``directory`` and fsync it; return the LSN it holds.

    Commits go on meanwhile (the copy is a reader). It is the checkpoint's
    base: LMDB runs without fsync, so after a power loss only a file that
    nothing has written since it was synced can be trusted.
    """
    with snap.gate.shared():
        txn = snap.begin_read()
        try:
            raw = snap.get_meta(APPLIED_LSN_NAME, txn)
            # LMDB's own thread writes the copy; its failure comes back here
            snap.env.copy(str(directory), compact=True, txn=txn)
        except lmdb.Error as exc:
            raise os_error(exc, "copy", directory / "data.mdb") from exc
        finally:
            txn.abort()
    _sync_copied_file(directory / "data.mdb")
    return int.from_bytes(raw, "little") if raw else 0


def compact(snap: SnapshotStore, purge_tombstones: bool = False) -> tuple[int, int]:
    """Rewrite the snapshot without free pages: (bytes before, bytes after).

    LMDB never shrinks its file; this copies the live pages into a new one
    (fsynced), then swaps directories. A crash at any point leaves either
    the old snapshot or the complete new one (``finish_compaction``).
    ``purge_tombstones`` also drops deleted keys' tombstones (only safe for
    a store that has never synced: the caller decides).
    """
    with snap.gate.exclusive():
        before = snap.file_bytes()
        if purge_tombstones:
            _purge_tombstones(snap)
        snap.env.sync(True)
        fresh, old = _compaction_paths(snap.path)
        if fresh.exists():
            _fs.remove_tree(fresh)
        _fs.make_dir(fresh)
        snap.env.copy(str(fresh), compact=True)
        _sync_copied_file(fresh / "data.mdb")
        snap.env.close()
        _fs.rename(snap.path, old)
        _fs.rename(fresh, snap.path)
        _fs.fsync_dir(snap.path.parent)
        _fs.remove_tree(old)
        snap.reopen_env(compacted=True)
        return before, snap.file_bytes()


def _purge_tombstones(snap: SnapshotStore) -> None:
    table = snap.conflicts.handle
    with snap.env.begin(write=True, db=snap.data_db) as txn:
        doomed = [bytes(k) for k, v in txn.cursor()
                  if all(s.data is None for s in decode_entry(snap.opened(k, v, "data")))]
        for key in doomed:
            txn.delete(key)
            if table is not None:
                txn.delete(key, db=table)


def load(snap: SnapshotStore, entries: Iterable[tuple[bytes, bytes]],
         meta: dict[bytes, bytes]) -> int:
    """Fill an empty snapshot with ``entries`` (key order) and metadata entries
    (the applied LSN among them), sealed, in transactions of bounded size;
    return how many entries. For repair: nothing reads it before it is done."""
    count = 0
    chunk: list[tuple[bytes, bytes]] = []
    size = 0

    def put(batch: list[tuple[bytes, bytes]]) -> None:
        def transaction() -> None:
            with snap.env.begin(write=True, db=snap.data_db) as txn:
                txn.cursor().putmulti([(k, seal(k, e)) for k, e in batch])
                snap.conflicts.index(txn, batch)
        snap.write("load", transaction)

    for key, entry in entries:
        chunk.append((key, entry))
        size += len(key) + len(entry)
        count += 1
        if len(chunk) >= 65536 or size >= _LOAD_BYTES:
            put(chunk)
            chunk, size = [], 0
    if chunk:
        put(chunk)

    def put_meta() -> None:
        with snap.env.begin(write=True) as txn:
            for name, value in meta.items():
                txn.put(name, seal(name, value), db=snap.meta_db)
    snap.write("load", put_meta)
    return count


class EntryWriter:
    """Puts entries into a write transaction of the data table, sealed (and keeps
    the conflicts table in step)."""

    def __init__(self, txn: lmdb.Transaction, conflicts: Any = None) -> None:
        self._txn = txn
        self._conflicts = conflicts

    def put(self, key: bytes, entry: bytes) -> None:
        self._txn.put(key, seal(key, entry))
        if self._conflicts is not None:
            if holds_siblings(entry):
                self._txn.put(key, b"", db=self._conflicts)
            else:
                self._txn.delete(key, db=self._conflicts)

    def delete(self, key: bytes) -> None:
        self._txn.delete(key)
        if self._conflicts is not None:
            self._txn.delete(key, db=self._conflicts)


def write_raw(snap: SnapshotStore, fn: Callable[[EntryWriter], None]) -> None:
    """Run ``fn`` with a writer of entries (sealed as they go) in one write
    transaction on the data table (tools, and tests that plant damage), once the
    records acknowledged before are applied (they would overwrite it)."""
    if snap.pending:
        snap.catch_up()
    with snap.gate.shared(), snap.env.begin(write=True, db=snap.data_db) as txn:
        fn(EntryWriter(txn, snap.conflicts.handle))


def _sync_copied_file(path: Path) -> None:
    """LMDB creates a copy with the process umask: make it 0600, fsync it and its directory."""
    os.chmod(path, _fs.FILE_MODE)
    _fs.fsync_file(path)
    _fs.fsync_dir(path.parent)


def _compaction_paths(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + ".compact"), path.with_name(path.name + ".old")


def compaction_survivor(path: Path) -> Path:
    """The snapshot directory the next writer's open will use (``finish_compaction``):
    ``path``, or what a compaction interrupted between its renames left. For readers
    that must not finish the compaction themselves (``verify``)."""
    fresh, old = _compaction_paths(path)
    if path.exists():
        return path
    return fresh if fresh.exists() else old if old.exists() else path


def finish_compaction(path: Path) -> None:
    """Complete or undo a compaction a crash interrupted (see ``compact``): what a
    writer's open does first (repair holds the writer lock too)."""
    fresh, old = _compaction_paths(path)
    if not path.exists():
        if fresh.exists():  # the copy was complete and synced before the swap began
            _fs.rename(fresh, path)
        elif old.exists():
            _fs.rename(old, path)
        _fs.fsync_dir(path.parent)
    for leftover in (fresh, old):
        if leftover.exists():
            _fs.remove_tree(leftover)
