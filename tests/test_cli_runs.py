"""`walsync runs` and `walsync checkpoints` (sync/cli/runs_cmds.py): what people and
scripts read of runs, and rolling a run back to a named checkpoint.

"restore" is only the host-loss restore from the server; going back to a named
checkpoint is `checkpoints rollback` (the library's ``Run.rollback``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.test_cli import EXIT_NOT_FOUND, EXIT_USAGE, cli, json_lines, ok
from walsync.engine import Store
from walsync.engine.workflow import Workflows

TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


@pytest.fixture
def runs_store(tmp_path: Path) -> str:
    """Run r1 (invoices, two steps done, checkpoint cp1 after the first, still running)
    and run r2 (other, nothing done)."""
    path = str(tmp_path / "w")
    with Store.open(path, node_id="nw") as store:
        wf = Workflows(store)
        run = wf.run("invoices", run_id="r1", total_steps=4)
        run.start()
        with run.begin("one") as ctx:
            ctx.complete({"x": 1})
        run.checkpoint("cp1", "after one", tags=["t", "u"])
        with run.begin("two") as ctx:
            ctx.complete([2])
        wf.run("other", run_id="r2", total_steps=1).pause("waiting")
    return path


def test_runs_list_for_people_and_scripts(runs_store: str) -> None:
    lines = ok("runs", "list", "-s", runs_store).stdout.splitlines()
    assert len(lines) == 2
    by_id = {line.split()[0]: line for line in lines}
    assert re.fullmatch(rf"r1 {{27}}invoices {{9}}running {{4}} 50\.0%  steps 2 {{4}}"
                        rf"\$0\.0000  updated {TIME}", by_id["r1"]), by_id["r1"]
    assert by_id["r2"].split()[:3] == ["r2", "other", "paused"]
    rows = json_lines(ok("runs", "list", "-s", runs_store, "--json"))
    assert sorted((r["run_id"], r["workflow"], r["steps_done"]) for r in rows) == [
        ("r1", "invoices", 2), ("r2", "other", 0)]
    only = json_lines(ok("runs", "list", "-s", runs_store, "--workflow", "other", "--json"))
    assert [r["run_id"] for r in only] == ["r2"]
    empty = ok("runs", "list", "-s", runs_store, "--status", "completed")
    assert empty.stdout == f"no runs in {runs_store} matching --status completed\n"
    assert ok("runs", "list", "-s", runs_store, "--status", "completed", "--json").stdout == ""
    resumable = json_lines(ok("runs", "resumable", "-s", runs_store, "--json"))
    assert sorted(r["run_id"] for r in resumable) == ["r1", "r2"]


def test_runs_show_lists_steps_in_order(runs_store: str) -> None:
    lines = ok("runs", "show", "-s", runs_store, "r1").stdout.splitlines()
    assert lines[0] == "run r1  workflow invoices v1  running  50%  cost $0.0000"
    assert [line.split()[:3] for line in lines[1:]] == [["0", "one", "success"],
                                                       ["1", "two", "success"]]
    doc = json.loads(ok("runs", "show", "-s", runs_store, "r1", "--json").stdout)
    assert doc["run"]["run_id"] == "r1"
    assert [s["step_id"] for s in doc["steps"]] == ["one", "two"]
    missing = cli("runs", "show", "-s", runs_store, "nope")
    assert missing.exit_code == EXIT_NOT_FOUND
    assert missing.stderr.startswith("error: ")


def test_checkpoints_list_then_rollback(runs_store: str) -> None:
    [line] = ok("checkpoints", "list", "-s", runs_store, "r1").stdout.splitlines()
    assert re.fullmatch(rf"cp1 {{21}} {TIME}  1 steps  running {{4}}t,u  after one", line), line
    [info] = json_lines(ok("checkpoints", "list", "-s", runs_store, "r1", "--json"))
    assert (info["name"], info["steps"], info["tags"]) == ("cp1", 1, ["t", "u"])

    done = ok("checkpoints", "rollback", "-s", runs_store, "r1", "cp1")
    assert done.stdout == "run r1 rolled back to 'cp1' (rollback #1); replaced steps kept: two\n"
    again = json.loads(ok("checkpoints", "rollback", "-s", runs_store, "r1", "cp1",
                          "--json").stdout)
    assert (again["checkpoint"], again["rollback"], again["discarded_steps"]) == ("cp1", 2, [])
    shown = json.loads(ok("runs", "show", "-s", runs_store, "r1", "--json").stdout)
    assert [s["step_id"] for s in shown["steps"]] == ["one"]
    assert cli("checkpoints", "rollback", "-s", runs_store, "r1", "nope").exit_code == \
        EXIT_NOT_FOUND


def test_checkpoints_restore_is_not_a_command(runs_store: str) -> None:
    """One meaning per word: a rollback is not a restore (that is the host-loss one)."""
    result = cli("checkpoints", "restore", "-s", runs_store, "r1", "cp1")
    assert result.exit_code == EXIT_USAGE
    assert "No such command 'restore'" in result.stderr
    assert "rollback" in ok("checkpoints", "--help").stdout


def test_runs_of_a_missing_store_exit_5(tmp_path: Path) -> None:
    result = cli("runs", "list", "-s", str(tmp_path / "none"))
    assert result.exit_code == EXIT_NOT_FOUND
