"""A store an older walsync wrote (key layout 1: runs under ``runs/``, LangGraph
checkpoints under ``lg/``) is brought into the reserved namespace (engine/FORMAT.md,
"Keys"; engine/workflow/legacy.py).

The store is written by the walsync of tests/workflow/_old_walsync.py's OLD_COMMIT
in a child process, with what a real one holds: finished runs, an output stored
apart, checkpoints, a rollback's discarded records, a run a crash left with a
non-idempotent step running, a run another host leases, a run another host wrote
(imported), a user key under a run's keys, and a LangGraph thread. The child
records each run's state as that walsync read it; this walsync must read the same.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import cbor2
import pytest

from tests.workflow._old_walsync import run_old
from walsync.engine import Store
from walsync.engine.errors import LeaseLostError, StepNeedsAttentionError
from walsync.engine.integrations.langgraph import LAYOUT, WalsyncSaver
from walsync.engine.keyspace import RESERVED_PREFIX
from walsync.engine.workflow import RetentionPolicy, Workflows, keys
from walsync.engine.workflow.legacy import MOVED
from walsync.sync.memory import MemoryServer
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.restore import restore

OWN = ["crashed", "done", "rolled", *(f"s{i}" for i in range(6))]
ALL = sorted([*OWN, "foreign", "leased"])

_BUILD = """
import sys
from typing import TypedDict

import cbor2
from langgraph.graph import END, START, StateGraph

from walsync.engine import Store, export_file, import_file
from walsync.engine.langgraph_saver import WalsyncSaver
from walsync.engine.workflow import Workflows

path, other, transfer, out = sys.argv[1:5]
big = "x" * 20_000  # above the inline limit: stored under outputs/

with Store.open(other, node_id="other-host") as store:
    with Workflows(store).run("etl", run_id="foreign") as run:
        run.step("a", lambda: "from the other host " + big)
        run.checkpoint("cp")
        run.step("b", lambda: big)
    export_file(store, transfer + "-run", prefix="runs/foreign")
    export_file(store, transfer + "-index", prefix="index/runs/foreign")

with Store.open(path, node_id="old-host") as store:
    wf = Workflows(store)
    with wf.run("etl", run_id="done") as run:
        run.step("a", lambda: "A")
        run.checkpoint("after-a", "a done", ["t"])
        run.step("b", lambda: big)
    run = wf.run("etl", run_id="rolled")
    with run:
        run.step("a", lambda: 1)
        run.checkpoint("cp")
        run.step("b", lambda: {"big": big})
    run.rollback("cp")
    with run:
        run.step("b", lambda: {"big": big + "2"})
    run = wf.run("billing", run_id="crashed")
    run.start()
    run.step("load", lambda: 3)
    run.begin("charge", idempotent=False).__enter__()  # a crash: left running
    for i in range(6):
        with wf.run("small", run_id=f"s{i}") as small:
            small.step("a", lambda i=i: i)
    with wf.run("etl", run_id="leased") as run:
        run.step("a", lambda: "A")
    store.put("runs/leased", {**store.get("runs/leased"), "owner_node": "other-host",
                              "lease_token": 5})
    import_file(store, transfer + "-run")
    import_file(store, transfer + "-index")
    store.put("runs/done/notes", "the user's")
    store.put("orders/1", {"n": 1})

    class S(TypedDict):
        value: int

    builder = StateGraph(S)
    builder.add_node("inc", lambda s: {"value": s["value"] + 1})
    builder.add_edge(START, "inc")
    builder.add_edge("inc", END)
    graph = builder.compile(checkpointer=WalsyncSaver(store))
    thread = {"configurable": {"thread_id": "t1"}}
    graph.invoke({"value": 1}, thread)
    graph.invoke({"value": 5}, thread)
    saver = WalsyncSaver(store)
    expected = {"saver": [c.checkpoint["id"] for c in saver.list(thread)],
                "saver_value": saver.get_tuple(thread).checkpoint["channel_values"]}
    for run_id in ["crashed", "done", "rolled", "leased", "foreign"] + [f"s{i}" for i in range(6)]:
        run = Workflows(store).get_run(run_id)
        expected[run_id] = {"state": run.state(), "snapshot": run.snapshot(),
                            "checkpoints": [c.name for c in run.checkpoints()],
                            "discarded": run.discarded()}
with open(out, "wb") as f:
    cbor2.dump(expected, f)
"""


@pytest.fixture(scope="module")
def old_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A store of key layout 1, written by the older walsync, and what it read back."""
    base = tmp_path_factory.mktemp("old")
    run_old(base / "engine", _BUILD, str(base / "store"), str(base / "other"),
            str(base / "transfer.wsx"), str(base / "expected.cbor"))
    with (base / "expected.cbor").open("rb") as f:
        return base / "store", cbor2.load(f)


@pytest.fixture
def store_copy(old_store: tuple[Path, dict[str, Any]], tmp_path: Path) -> Path:
    path = tmp_path / "store"
    shutil.copytree(old_store[0], path)
    return path


def moved(value: Any) -> Any:
    """A state as the older walsync read it, with the keys inside it in the namespace."""
    if isinstance(value, dict):
        out = {k: moved(v) for k, v in value.items()}
        if isinstance(out.get("output_key"), str):
            out["output_key"] = keys.translate(out["output_key"])
        return out
    if isinstance(value, list):
        return [moved(v) for v in value]
    return value


def legacy_keys_of(store: Store, run_id: str) -> list[str]:
    return [k for k in [*store.keys(keys.LEGACY.all_of_run(run_id)),
                        keys.LEGACY.run(run_id), keys.LEGACY.index(run_id)]
            if store.get_version(k) is not None and not k.endswith("/notes")]


def namespace_keys_of(store: Store, run_id: str) -> list[str]:
    return [k for k in [*store.keys(keys.all_of_run(run_id)), keys.run(run_id),
                        keys.index(run_id)] if store.get_version(k) is not None]


def assert_read_as_before(wf: Workflows, expected: dict[str, Any], run_id: str,
                          *, in_namespace: bool = True) -> None:
    run = wf.get_run(run_id)
    want = expected[run_id]
    translate = moved if in_namespace else (lambda v: v)
    assert run.state() == translate(want["state"])
    assert run.snapshot() == want["snapshot"]
    assert [c.name for c in run.checkpoints()] == want["checkpoints"]
    assert run.discarded() == translate(want["discarded"])


def test_the_older_walsync_wrote_layout_1(old_store: tuple[Path, dict[str, Any]]) -> None:
    path, expected = old_store
    with Store.open(path, readonly=True) as store:
        assert store.keys(RESERVED_PREFIX) == []
        assert sorted(k[len("index/runs/"):] for k in store.keys("index/runs/")) == ALL
        assert store.keys("runs/rolled/discarded/")
        assert store.keys("runs/done/outputs/")
        assert store.get("lg/layout") == LAYOUT
    assert expected["crashed"]["state"]["steps"]["charge"]["status"] == "running"


def test_own_runs_move_into_the_namespace_once_and_read_as_before(
        store_copy: Path, old_store: tuple[Path, dict[str, Any]]) -> None:
    expected = old_store[1]
    with Store.open(store_copy) as store:
        wf = Workflows(store)
        assert sorted(wf.moved_runs) == sorted(OWN)
        for run_id in OWN:
            assert legacy_keys_of(store, run_id) == [], run_id
            assert_read_as_before(wf, expected, run_id)
        # another host's runs stay where they are, listed and read in place
        for run_id in ("foreign", "leased"):
            assert namespace_keys_of(store, run_id) == []
            assert_read_as_before(wf, expected, run_id, in_namespace=False)
        assert [r.run_id for r in wf.list_runs()] == ALL
        assert store.keys("index/runs/") == ["index/runs/foreign", "index/runs/leased"]
        assert store.get("runs/done/notes") == "the user's"  # the user's key stays the user's
        assert store.get("orders/1") == {"n": 1}
        assert store.sync_state(MOVED)
        # the rules hold on the moved runs: a success never runs again, the crashed
        # non-idempotent step waits for the orchestrator
        with Workflows(store).run("etl", run_id="done") as run:
            assert run.step("b", lambda: pytest.fail("ran again")) == expected["done"][
                "snapshot"]["b"]
        run = Workflows(store).get_run("crashed")
        with pytest.raises(StepNeedsAttentionError), run:
            run.step("charge", lambda: pytest.fail("charged twice"))
        assert run.interrupted == [("charge", "needs attention")]
        assert Workflows(store).get_run("rolled").rollback("cp").discarded_steps == ["b"]
    with Store.open(store_copy) as store:
        assert Workflows(store).moved_runs == []  # once


def test_another_hosts_run_moves_with_this_hosts_first_write_to_it(
        store_copy: Path, old_store: tuple[Path, dict[str, Any]]) -> None:
    expected = old_store[1]
    with Store.open(store_copy) as store:
        wf = Workflows(store)
        run = wf.get_run("foreign")
        run.set_metadata(taken_over=True)
        assert legacy_keys_of(store, "foreign") == []
        assert run.state()["steps"] == moved(expected["foreign"]["state"]["steps"])
        assert Workflows(store).get_run("foreign").record.metadata == {"taken_over": True}
        assert Workflows(store).get_run("foreign").snapshot() == expected["foreign"]["snapshot"]
        # a run another host leases is refused, and stays where it is
        leased = wf.get_run("leased")
        with pytest.raises(LeaseLostError):
            leased.set_metadata(x=1)
        assert namespace_keys_of(store, "leased") == []


def test_a_rollback_of_another_hosts_run_moves_it_first(
        store_copy: Path, old_store: tuple[Path, dict[str, Any]]) -> None:
    expected = old_store[1]
    with Store.open(store_copy) as store:
        recovered = Workflows(store).recover(
            "foreign", "etl", validator=lambda state: "b" not in state["steps"])
        assert recovered.outcome == "checkpoint"
        assert legacy_keys_of(store, "foreign") == []
        kept = recovered.run.discarded()[1]["b"]
        assert kept["output_key"].startswith(keys.all_of_run("foreign"))
        assert store.get(kept["output_key"]) == expected["foreign"]["snapshot"]["b"]
        with Workflows(store).run("etl", run_id="foreign") as run:
            assert run.step("b", lambda: "again") == "again"
        assert Workflows(store).get_run("foreign").snapshot() == {
            "a": expected["foreign"]["snapshot"]["a"], "b": "again"}


def test_the_langgraph_checkpoints_move_into_the_namespace(
        store_copy: Path, old_store: tuple[Path, dict[str, Any]]) -> None:
    expected = old_store[1]
    thread = {"configurable": {"thread_id": "t1"}}
    with Store.open(store_copy) as store:
        saver = WalsyncSaver(store)
        assert store.keys("lg/") == []
        assert store.get(f"{RESERVED_PREFIX}lg/layout") == LAYOUT
        assert [c.checkpoint["id"] for c in saver.list(thread)] == expected["saver"]
        got = saver.get_tuple(thread)
        assert got is not None
        assert got.checkpoint["channel_values"] == expected["saver_value"]
        store.put("lg/layout", "a user's key now")
    with Store.open(store_copy) as store:
        WalsyncSaver(store)  # the layout key is in the namespace: lg/ is never moved again
        assert store.get("lg/layout") == "a user's key now"


def test_a_read_only_store_of_layout_1_is_read_in_place(
        store_copy: Path, old_store: tuple[Path, dict[str, Any]]) -> None:
    expected = old_store[1]
    with Store.open(store_copy, readonly=True) as store:
        wf = Workflows(store)
        assert wf.moved_runs == []
        assert [r.run_id for r in wf.list_runs()] == ALL
        for run_id in ALL:
            assert_read_as_before(wf, expected, run_id, in_namespace=False)
        saver = WalsyncSaver(store)
        assert [c.checkpoint["id"] for c in saver.list(
            {"configurable": {"thread_id": "t1"}})] == expected["saver"]


_KILLED = """
import os, signal, sys
from walsync.engine import Store
import walsync.engine.integrations.langgraph as lg
from walsync.engine.workflow import Workflows

path, after = sys.argv[1], int(sys.argv[2])
lg._MIGRATE_CHUNK = 3  # the saver's move takes several commits
commit, done = Store.commit, [0]

def counted(self, *args, **kwargs):
    result = commit(self, *args, **kwargs)
    done[0] += 1
    if done[0] == after:
        os.kill(os.getpid(), signal.SIGKILL)
    return result

Store.commit = counted
with Store.open(path) as store:
    Workflows(store)
    lg.WalsyncSaver(store)
print("finished", done[0])
"""


@pytest.mark.crash
def test_a_sigkill_during_the_moves_leaves_each_run_whole_and_the_next_open_finishes(
        old_store: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    expected = old_store[1]
    thread = {"configurable": {"thread_id": "t1"}}
    after = 1
    while True:
        path = tmp_path / f"store{after}"
        shutil.copytree(old_store[0], path)
        child = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLED), str(path),
                                str(after)], capture_output=True, text=True, timeout=300,
                               check=False)
        if child.returncode == 0:
            assert child.stdout.startswith("finished")
            break
        assert child.returncode == -signal.SIGKILL, child.stderr
        with Store.open(path) as store:
            for run_id in OWN:  # whole in one spelling or the other
                old, new = legacy_keys_of(store, run_id), namespace_keys_of(store, run_id)
                assert bool(old) != bool(new), (after, run_id, old, new)
            wf = Workflows(store)
            for run_id in OWN:
                assert_read_as_before(wf, expected, run_id)
            saver = WalsyncSaver(store)
            assert store.keys("lg/") == []
            assert [c.checkpoint["id"] for c in saver.list(thread)] == expected["saver"]
        after += 1
    assert after > len(OWN) + 2  # killed after each run's move and within the saver's


def test_a_lost_host_of_the_older_walsync_is_restored_and_its_runs_resume_here(
        store_copy: Path, old_store: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """The lost host's runs reach the server in the legacy spelling (it never ran this
    walsync's Workflows); restore finds them by either spelling, and the host that takes
    one over reads it where it is and moves it with its first write."""
    expected = old_store[1]
    server = MemoryServer()
    with Store.open(store_copy) as lost:
        Replicator(lost, server.transport(), ReplicatorOptions(
            pull_interval_seconds=0, batch_wait_seconds=0)).run_once()
        lost_node = lost.node_id  # a copied directory ships under a fresh node id
    report = restore(server.transport(), tmp_path / "new", lost_node=lost_node)
    assert report.resumable_runs == ["crashed"]
    with Store.open(tmp_path / "new") as store:
        wf = Workflows(store)
        assert wf.moved_runs == []  # another node's runs: moved by a write, not on open
        assert sorted(r.run_id for r in wf.list_runs()) == sorted([*OWN, "leased"])
        assert store.keys(keys.RUNS) == []
        run = wf.run("billing", run_id="crashed")
        with pytest.raises(StepNeedsAttentionError), run:
            run.step("charge", lambda: pytest.fail("charged twice"))
        assert legacy_keys_of(store, "crashed") == []
        assert Workflows(store).get_run("crashed").snapshot() == expected["crashed"]["snapshot"]


def test_retention_removes_a_run_in_either_spelling_and_leaves_the_users_keys(
        store_copy: Path) -> None:
    with Store.open(store_copy) as store:
        wf = Workflows(store)
        report = wf.apply_retention(RetentionPolicy(max_age_seconds=0))
        assert sorted(report.runs_removed) == sorted(
            ["done", "rolled", "foreign", *(f"s{i}" for i in range(6))])
        assert report.runs_leased_elsewhere == ["leased"]
        for run_id in report.runs_removed:
            assert legacy_keys_of(store, run_id) == namespace_keys_of(store, run_id) == []
        assert [r.run_id for r in wf.list_runs()] == ["crashed", "leased"]
        assert store.get("runs/done/notes") == "the user's"
