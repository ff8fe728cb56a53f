"""What the commands share: the ``--store`` option and opening a store to read."""

from __future__ import annotations

import click

from walsync.engine import Store, StoreLockedError

__all__ = ["open_read", "store_option"]

store_option = click.option(
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


def open_read(store_path: str) -> Store:
    """Read-only when a writer holds the store, so debugging never blocks it."""
    try:
        return Store.open(store_path, create=False)
    except StoreLockedError:
        return Store.open(store_path, readonly=True)
