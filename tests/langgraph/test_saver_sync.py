"""LangGraph checkpoints replicate like any other keys: a thread resumes on another host."""

from __future__ import annotations

from pathlib import Path

import pytest
from langgraph.types import Command

from tests.langgraph._graph_child import config, question_graph
from walsync.engine import Store
from walsync.engine.integrations.langgraph import WalsyncSaver
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.restore import restore

pytestmark = pytest.mark.postgres


def _effects(workdir: Path) -> list[str]:
    path = workdir / "effects"
    return path.read_text().split() if path.exists() else []


def test_interrupted_thread_resumes_on_a_restored_host(tmp_path: Path, pg_db: str) -> None:
    migrate(pg_db)
    work_a, work_b = tmp_path / "a-work", tmp_path / "b-work"
    work_a.mkdir()
    work_b.mkdir()
    cfg = config("thread-1")
    with Store.open(tmp_path / "a") as store_a:
        saver = WalsyncSaver(store_a)
        asked = question_graph(work_a).compile(checkpointer=saver).invoke(
            {"value": 1}, cfg, durability="sync")
        assert "ship it?" in str(asked["__interrupt__"])
        rep = Replicator(store_a, PostgresTransport(pg_db), ReplicatorOptions(pull=False))
        rep.ship()
        rep.close()
    # Host A is gone; B is rebuilt from the server and answers the question.
    transport = PostgresTransport(pg_db)
    try:
        report = restore(transport, tmp_path / "b")
    finally:
        transport.close()
    assert report.keys > 0
    with Store.open(tmp_path / "b") as store_b:
        saver_b = WalsyncSaver(store_b)
        assert saver_b.get_tuple(cfg) is not None
        done = question_graph(work_b).compile(checkpointer=saver_b).invoke(
            Command(resume="yes"), cfg, durability="sync")
    assert done["answer"] == "yes"
    assert done["value"] == 4  # prepare: 1 + 1, finish: * 2
    assert _effects(work_a) == ["prepare", "ask"]
    assert "prepare" not in _effects(work_b)  # never re-run on the new host
    assert _effects(work_b)[-1] == "finish"
