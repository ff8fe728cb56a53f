"""Opening LMDB files, and what LMDB's errors say about them.

LMDB runs without its own fsync (``sync=False``): the WAL is the source of
truth, and a checkpoint syncs the snapshot (snapshot_store.py). Its errors
fall in three kinds, told apart here for every reader and writer of a
snapshot or base: damage to the file's pages (CorruptionError, which repair
mends), a failed write or sync of the file (the OSError it stands for, which
poisons the store), and conditions that say nothing about the file.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import lmdb

from .. import _fs
from ..errors import CorruptionError, StoreStateError
from .seal import REPAIR_HINT

__all__ = [
    "DAMAGE_ON_WRITE",
    "NOT_DAMAGE",
    "SnapshotUninitialisedError",
    "check_length",
    "open_env",
    "os_error",
]

#: LMDB errors that say nothing about the file's pages (every other one met while
#: reading means they are not what LMDB wrote)
NOT_DAMAGE: tuple[type[lmdb.Error], ...] = (
    lmdb.MapResizedError, lmdb.ReadersFullError, lmdb.BadRslotError, lmdb.TlsFullError,
    lmdb.MemoryError,
)

#: LMDB errors a write meets on a file whose pages are damaged
DAMAGE_ON_WRITE: tuple[type[lmdb.Error], ...] = (
    lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError, lmdb.IncompatibleError,
    lmdb.BadValsizeError,
)


class SnapshotUninitialisedError(StoreStateError):
    """A read-only open found an LMDB environment whose tables were never created."""


def open_env(path: Path, map_size_bytes: int, readonly: bool) -> lmdb.Environment:
    """A store's snapshot environment, as every handle of it is opened. No
    ``writemap``: other processes read the file."""
    try:
        return lmdb.open(
            str(path),
            map_size=map_size_bytes,
            subdir=True,
            readonly=readonly,
            create=not readonly,
            max_dbs=4,
            sync=False,
            metasync=False,
            writemap=False,
            map_async=False,
            readahead=False,
            lock=True,
            mode=_fs.FILE_MODE,
        )
    except lmdb.Error as exc:
        if "already open in this process" in str(exc):
            # not damage: LMDB allows one handle per environment and process
            raise StoreStateError(
                f"the snapshot {path} is already open in this process",
                hint="share the open Store handle; open a second one (even read-only) "
                "from another process",
            ) from None
        raise CorruptionError(f"cannot open the LMDB snapshot: {exc}", path=str(path)) from None


def os_error(exc: lmdb.Error, doing: str, path: Path) -> OSError:
    """LMDB's error as the OSError it stands for (EIO when it is LMDB's own),
    naming the file, for the store to report (ENOSPC: disk full)."""
    code = getattr(exc, "code", 0)
    if not isinstance(code, int) or code <= 0:
        code = errno.EIO
    return OSError(code, f"LMDB {doing} failed: {exc}", str(path))


def check_length(env: lmdb.Environment, data_file: Path) -> None:
    """Refuse a file shorter than the pages its meta page counts (cut short, or a
    damaged page count): LMDB maps the file and would fault reading past its end.
    A writer extends the file before its meta page counts the new pages, so the
    count is read first."""
    last = int(env.info()["last_pgno"])
    size = os.path.getsize(data_file)
    need = (last + 1) * int(env.stat()["psize"])
    if size < need:
        raise CorruptionError(
            f"the file holds {size} bytes but LMDB's meta page counts {last + 1} pages "
            f"({need} bytes): it was cut short, or its meta page is damaged",
            path=str(data_file), hint=REPAIR_HINT)
