"""Fixtures for the workflow-layer suites: stores in a temporary directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from walsync.engine import Store
from walsync.engine.workflow import Workflows


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_path: Path) -> Iterator[Store]:
    """A store with the default durability (every commit fdatasync'ed)."""
    s = Store.open(store_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def wf(store: Store) -> Workflows:
    return Workflows(store)


@pytest.fixture
def fast_store(tmp_path: Path) -> Iterator[Store]:
    """A store committing with durability 'none', for tests that build large runs."""
    s = Store.open(tmp_path / "fast", durability="none")
    try:
        yield s
    finally:
        s.close()
