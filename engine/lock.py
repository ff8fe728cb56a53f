"""The single-writer lock of a store directory.

An ``flock`` on ``LOCK``: the kernel drops it when the holding process dies,
however it dies, so a stale lock never blocks anyone. The holder writes its
pid into the file so that the next writer's error can name it.

A sync worker running beside the store (engine/handoff.py) takes this lock only
for the moment it merges what it pulled while no writer is open, and lets go: a
writer that finds the lock held by the process that holds ``SYNC.lock`` waits
for it, up to ``HANDOFF_WAIT_SECONDS`` (or its own timeout, if longer), instead
of failing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from . import _fs
from .errors import StoreLockedError
from .handoff import sync_holder_pid

__all__ = [
    "HANDOFF_WAIT_SECONDS",
    "WriterLock",
    "read_holder_pid",
    "writable_directory",
    "writer_is_alive",
]

#: how long a writer's open waits for a sync worker's hand-off (one merge of the pages
#: it pulled, an open and a close of the store: well under a second on a sound disk)
HANDOFF_WAIT_SECONDS = 10.0


def read_holder_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def writable_directory(root: Path) -> bool:
    """Whether this process may write in the store directory ``root``: not on a
    read-only file system or mount, nor denied by its permissions. Such a store opens
    read-only only (engine/FORMAT.md, "Readers")."""
    return os.access(root, os.W_OK)


def writer_is_alive(path: Path) -> bool:
    """Whether a live process holds the writer lock (for readers, who never take it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # drops the shared lock, if it was taken
    return False


class WriterLock:
    def __init__(self, path: Path, store_path: str) -> None:
        self._path = path
        self._store_path = store_path
        self._fd: int | None = None

    def acquire(self, timeout_seconds: float = 0.0) -> None:
        fd = _fs.open_lock(self._path)
        started = time.monotonic()
        deadline = started + timeout_seconds
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline and self._sync_handoff():
                    deadline = max(deadline, started + HANDOFF_WAIT_SECONDS)
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreLockedError(self._store_path, read_holder_pid(self._path)) from None
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.1)
        try:
            _fs.truncate(fd, 0)
            _fs.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)  # drops the flock: a failed open must not keep the store locked
            raise
        self._fd = fd

    def _sync_handoff(self) -> bool:
        """Whether the holder is the store's sync worker, merging what it pulled."""
        pid = read_holder_pid(self._path)
        return pid is not None and pid == sync_holder_pid(self._path.parent)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                with contextlib.suppress(OSError):
                    _fs.truncate(fd, 0)
            finally:
                os.close(fd)  # whatever happened above: closing drops the flock
