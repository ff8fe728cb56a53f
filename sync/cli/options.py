"""What the commands share: the ``--store`` option (with ``--lock-timeout``), opening a
store to read or to write, and the type of a key argument."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from walsync.engine import Store, StoreLockedError
from walsync.engine.lock import writable_directory

from .output import busy

__all__ = ["KEY", "lock_timeout_seconds", "open_read", "open_write", "store_option"]

_F = TypeVar("_F", bound=Callable[..., Any])

#: where ``--lock-timeout`` leaves its value for ``open_write`` (click's context meta)
_LOCK_TIMEOUT = "walsync.lock_timeout_seconds"

_store = click.option(
    "--store",
    "-s",
    "store_path",
    envvar="WALSYNC_STORE",
    default=".walsync",
    show_default=True,
    show_envvar=True,
    type=click.Path(file_okay=False),
    help="Store directory.",
)


def _keep_lock_timeout(ctx: click.Context, _param: click.Parameter, value: float) -> float:
    ctx.meta[_LOCK_TIMEOUT] = value
    return value


_lock_timeout = click.option(
    "--lock-timeout",
    type=click.FloatRange(min=0),
    default=0.0,
    envvar="WALSYNC_LOCK_TIMEOUT",
    show_envvar=True,
    metavar="SECONDS",
    expose_value=False,
    callback=_keep_lock_timeout,
    help="Wait this long for another process's writer lock on the store (default: fail "
         "at once, exit 4).",
)


def store_option(command: _F) -> _F:
    """``--store`` and ``--lock-timeout``: every command on a store takes both, and
    ``open_write`` honours the second."""
    return _store(_lock_timeout(command))


def lock_timeout_seconds() -> float:
    """The command's ``--lock-timeout`` (0 outside a command that takes it)."""
    ctx = click.get_current_context(silent=True)
    return float(ctx.meta.get(_LOCK_TIMEOUT, 0.0)) if ctx is not None else 0.0


def open_write(store_path: str, *, create: bool = False, **overrides: Any) -> Store:
    """The store opened as its writer, waiting ``--lock-timeout`` seconds for the lock
    (a bar on a terminal while the open replays the WAL or waits for the lock)."""
    wait = lock_timeout_seconds()
    with busy(f"opening {store_path}" + (" (waiting for the writer lock)" if wait else "")):
        return Store.open(store_path, create=create, lock_timeout_seconds=wait, **overrides)


def open_read(store_path: str) -> Store:
    """Read-only when a writer holds the store, so debugging never blocks it, and when
    the store cannot be written (a read-only file system or mount); else as its writer,
    whose open first replays what a crash left in the WAL."""
    with busy(f"opening {store_path}"):
        if not writable_directory(Path(store_path)):
            return Store.open(store_path, readonly=True)
        try:
            return Store.open(store_path, create=False)
        except StoreLockedError:
            return Store.open(store_path, readonly=True)


class _Key(click.ParamType[str]):
    """A key (or a key prefix, or a run id): text. The shell hands bytes that are not
    UTF-8 over as lone surrogates, which no store takes; they are a usage error that
    shows the bytes as they were typed."""

    name = "key"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        text = str(value)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "surrogateescape")
            self.fail(f"{raw!r} is not UTF-8 text: keys, prefixes and run ids are UTF-8",
                      param, ctx)
        return text


KEY = _Key()
