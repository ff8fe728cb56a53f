"""The file layer: the only module that writes, syncs, renames or removes.

Keeping every such call here gives fault-injection tests one seam: they
replace these functions (``monkeypatch.setattr(engine._fs, "fdatasync", ...)``)
and every caller sees the fault. Callers must therefore call them through the
module (``_fs.fdatasync(fd)``), never import the names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "atomic_write",
    "fdatasync",
    "fsync",
    "fsync_dir",
    "make_dir",
    "open_append",
    "open_segment",
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
    written = os.writev(fd, buffers)
    if written == total:
        return written
    data = b"".join(buffers)[written:]
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    return total


def fdatasync(fd: int) -> None:
    os.fdatasync(fd)


def fsync(fd: int) -> None:
    os.fsync(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def truncate(fd: int, length: int) -> None:
    os.ftruncate(fd, length)


def rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def unlink(path: Path) -> None:
    os.unlink(path)


def make_dir(path: Path) -> bool:
    """Create a 0700 directory and sync its parent; False if it existed."""
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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        writev(fd, [data])
        fsync(fd)
    finally:
        os.close(fd)
    rename(tmp, path)
    fsync_dir(path.parent)
