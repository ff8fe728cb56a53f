"""Whether a store handle may still read and write, and why not.

One place decides it for every part of the store (commits, checkpoints, sync's
bookkeeping): closed, opened read-only, or *poisoned*. A failed write or sync
(of the WAL, LMDB, the STORE file), on any thread, poisons the store: nothing
written after it could be trusted (a later fsync that reports success may not
cover the pages the failed one lost), so every later write is refused with an
error of the failure's kind, caused by it. Reopening the store replays the WAL.
"""

from __future__ import annotations

import errno
import logging

from .errors import (
    CorruptionError,
    DiskFullError,
    ReadOnlyStoreError,
    StoreClosedError,
    StorePoisonedError,
    WalsyncError,
)

__all__ = ["Health", "fresh"]

log = logging.getLogger("walsync.store")


class Health:
    """A store handle's state: open or closed, writable or not, and the first failure."""

    __slots__ = ("closed", "path", "poisoned", "readonly")

    def __init__(self, path: str, readonly: bool) -> None:
        self.path = path
        self.readonly = readonly
        self.closed = True
        #: the failure that made the store refuse writes; never cleared
        self.poisoned: WalsyncError | None = None

    def check_open(self) -> None:
        if self.closed:
            raise StoreClosedError(f"store {self.path} is closed")

    def check_writable(self) -> None:
        if self.closed:
            raise StoreClosedError(f"store {self.path} is closed")
        if self.readonly:
            raise ReadOnlyStoreError(f"store {self.path} was opened read-only")
        if self.poisoned is not None:
            raise self.refusal(self.poisoned)

    def refusal(self, poisoned: WalsyncError) -> WalsyncError:
        """The error a write meets once the store is poisoned: of the same kind as
        the failure (disk full stays DiskFullError), caused by it (and so by its
        OSError), wherever it happened (a helper thread's failure shows here)."""
        kind = type(poisoned) if isinstance(poisoned, StorePoisonedError) else StorePoisonedError
        error = kind(f"store {self.path} refuses writes since an earlier failure: {poisoned}")
        error.__cause__ = poisoned
        return error

    def poison(self, exc: BaseException, doing: str) -> WalsyncError:
        """Refuse every later write because ``exc`` happened during ``doing``; returns
        the error to raise, which later refusals name."""
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            error: WalsyncError = DiskFullError(
                f"disk full during {doing} in store {self.path}: {exc}"
            )
        else:
            error = StorePoisonedError(
                f"{type(exc).__name__} during {doing} in store {self.path}: {exc}; "
                "the store refuses further writes",
                # damage found while writing: reopening does not mend it, repair does
                hint=exc.hint if isinstance(exc, CorruptionError) else None,
            )
        error.__cause__ = exc
        self.poisoned = error
        log.error("%s", error)
        return error


def fresh(error: WalsyncError) -> WalsyncError:
    """A new exception per waiting thread (one instance raised in many threads
    would share and grow one traceback)."""
    copy = type(error).__new__(type(error))
    copy.__dict__.update(error.__dict__)
    copy.args = error.args
    copy.__cause__ = error.__cause__
    return copy
