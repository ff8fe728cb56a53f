"""Restoring a lost node's runs takes each run's keys and nothing else (sync/restore.py
reads them by the key grammar, engine/workflow/keys.py), on the in-memory server."""

from __future__ import annotations

from pathlib import Path

from walsync.engine import Store
from walsync.engine.workflow import Workflows, keys
from walsync.sync.memory import MemoryServer
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.restore import restore

ONCE = ReplicatorOptions(pull_interval_seconds=0, batch_wait_seconds=0)


def test_a_lost_nodes_runs_come_back_without_the_runs_whose_ids_extend_theirs(
        tmp_path: Path) -> None:
    server = MemoryServer()
    with Store.open(tmp_path / "a", node_id="A") as a:
        with Workflows(a).run("w", run_id="r1") as run:
            run.step("s", lambda: "A's")
        a.put("runs/r1/notes", "a user's key, not the run's")
        Replicator(a, server.transport(), ONCE).run_once()
    with Store.open(tmp_path / "b", node_id="B") as b:
        with Workflows(b).run("w", run_id="r10") as run:
            run.step("s", lambda: "B's")
        Replicator(b, server.transport(), ONCE).run_once()
    report = restore(server.transport(), tmp_path / "new", lost_node="A")
    with Store.open(tmp_path / "new") as store:
        assert [r.run_id for r in Workflows(store).list_runs()] == ["r1"]
        assert sorted(store.keys()) == [keys.index("r1"), keys.run("r1"),
                                        keys.step("r1", "s")]
    assert report.keys == 3
