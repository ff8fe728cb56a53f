"""The file layer: the only module that writes, syncs, renames or removes.

Keeping every such call here gives fault-injection tests one seam: they
replace these functions (``monkeypatch.setattr(engine._fs, "fdatasync", ...)``)
and every caller sees the fault. Callers must therefore call them through the
module (``_fs.fdatasync(fd)``), never import the names.

A call interrupted by a signal is retried here (CPython already retries EINTR
itself, PEP 475, unless a handler raises); a short write is completed; any
other failure is raised as it came, for the store to stop writing.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "atomic_write",
    "boot_id",
    "copy_file",
    "fdatasync",
    "fsync",
    "fsync_dir",
    "fsync_file",
    "make_dir",
    "open_append",
    "open_lock",
    "open_segment",
    "pwrite",
    "remove_tree",
    "rename",
    "truncate",
    "unlink",
    "writev",
    "zero_fill",
]

FILE_MODE = 0o600
DIR_MODE = 0o700


def open_append(path: Path) -> int:
    """Open (creating if absent) for appending writes; mode 0600."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)


def open_segment(path: Path, *, create: bool) -> int:
    """Open a segment for positioned writes (no O_APPEND: preallocated space is
    overwritten in place); ``create`` makes a new empty file, replacing any."""
    flags = os.O_WRONLY | os.O_CLOEXEC
    if create:
        flags |= os.O_CREAT | os.O_TRUNC
    return os.open(path, flags, FILE_MODE)


def open_lock(path: Path) -> int:
    """Open (creating if absent) the lock file for reading and writing."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)


_ZEROS = bytes(1 << 20)


def zero_fill(fd: int, size: int, stop: Callable[[], bool]) -> bool:
    """Write ``size`` zero bytes from the file's position, then fsync; False if
    ``stop()`` said to give up first (checked between 1 MiB writes).

    Runs in the background while commits fdatasync: each 1 MiB is flushed as
    it is written, so the disk sees small writes instead of one long burst
    (the intermediate flushes bypass the fault-injection seam on purpose:
    they are not a commit's)."""
    done = 0
    view = memoryview(_ZEROS)
    while done < size:
        if stop():
            return False
        n = os.write(fd, view[: min(len(_ZEROS), size - done)])
        done += n
        if done < size:
            os.fdatasync(fd)
    fsync(fd)
    return True


def _iov_max() -> int:
    try:
        limit = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        limit = -1
    return limit if limit > 0 else 1024


#: writev takes at most this many buffers (more fail with EINVAL)
_IOV_MAX = _iov_max()


def writev(fd: int, buffers: Sequence[bytes]) -> int:
    """Write every buffer fully, looping over short writes."""
    if len(buffers) > _IOV_MAX:
        # a group commit of more records than the kernel takes in one call
        return sum(
            writev(fd, buffers[i : i + _IOV_MAX]) for i in range(0, len(buffers), _IOV_MAX)
        )
    total = sum(len(b) for b in buffers)
    written = _retry(os.writev, fd, buffers)
    if written == total:
        return written
    data = b"".join(buffers)[written:]
    view = memoryview(data)
    while view:
        n = _retry(os.write, fd, view)
        if n <= 0:
            raise OSError(errno.EIO, f"write returned {n} with {len(view)} bytes left")
        view = view[n:]
    return total


def pwrite(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset``, looping over short writes."""
    view = memoryview(data)
    while view:
        n = _retry(os.pwrite, fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"pwrite returned {n} with {len(view)} bytes left")
        view = view[n:]
        offset += n


def _retry(call: Callable[..., int], *args: Any) -> int:
    """``call(*args)``, again while it fails with EINTR: an interrupted write
    wrote nothing (a partial one returns its count instead)."""
    while True:
        try:
            return call(*args)
        except InterruptedError:
            continue


def fdatasync(fd: int) -> None:
    _retry_sync(os.fdatasync, fd)


def fsync(fd: int) -> None:
    _retry_sync(os.fsync, fd)


def _retry_sync(call: Callable[[int], None], fd: int) -> None:
    """An interrupted sync reported no error about the data, so asking again is
    safe (unlike after EIO, which is raised: see StorePoisonedError)."""
    while True:
        try:
            call(fd)
            return
        except InterruptedError:
            continue


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _retry_sync(os.fsync, fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync a file written by someone else (LMDB's copy, a copied segment)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to a new 0600 file ``dst`` and fsync it (not its directory)."""
    shutil.copyfile(src, dst)
    os.chmod(dst, FILE_MODE)
    fsync_file(dst)


def remove_tree(path: Path) -> None:
    """Remove a directory and everything under it."""
    shutil.rmtree(path)


def truncate(fd: int, length: int) -> None:
    os.ftruncate(fd, length)


def rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def unlink(path: Path) -> None:
    os.unlink(path)


def make_dir(path: Path, *, parents: bool = False) -> bool:
    """Create a 0700 directory and sync its parent; False if it existed.

    With ``parents``, missing ancestors are created first (not synced)."""
    if parents:
        path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return False
    fsync_dir(path.parent)
    return True


def atomic_write(path: Path, data: bytes) -> None:
    """Replace a small file so a crash leaves either the old or the new one.

    tmp → write → fsync → rename → fsync directory.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = open_segment(tmp, create=True)
    try:
        written = writev(fd, [data])
        if written != len(data):
            raise OSError(errno.EIO, f"short write: {written} of {len(data)} bytes", str(tmp))
        fsync(fd)
    finally:
        os.close(fd)
    rename(tmp, path)
    fsync_dir(path.parent)


_BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str | None:
    """This boot of the machine, or None where the system does not tell.

    A store left open under another boot id went down with the machine (power
    loss, kernel crash), not with its process: writes that were never synced
    may be torn. Tests replace this function to simulate a restart.
    """
    try:
        return _BOOT_ID_FILE.read_text().strip() or None
    except OSError:
        return None
