"""Fixtures for the async suites: a store in a temporary directory, wrapped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from walsync.engine import Store
from walsync.engine.aio import AsyncStore


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def astore(store_path: Path) -> Iterator[AsyncStore]:
    """A store with the default durability (every commit fdatasync'ed), awaited."""
    s = AsyncStore(Store.open(store_path))
    try:
        yield s
    finally:
        s.close()
