"""Fixtures for the LangGraph saver tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from walsync.engine import Store
from walsync.engine.integrations.langgraph import WalsyncSaver


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "store") as opened:
        yield opened


@pytest.fixture
def saver(store: Store) -> WalsyncSaver:
    return WalsyncSaver(store)
