"""A LangGraph graph across processes: SIGKILL mid-graph, and interrupt() answered elsewhere.

The child (``_graph_child``) runs real StateGraphs on a WalsyncSaver with
durability="sync"; every node body appends its name to an fsync'ed effects
file, so the parent counts how often each body ran in all processes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from walsync.engine.integrations.langgraph import WalsyncSaver

from ._graph_child import chain_graph, config, read_effects

pytestmark = pytest.mark.crash

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD = "tests.langgraph._graph_child"
DEADLINE_SECONDS = 60.0


def child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", CHILD, *args], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result_of(proc: subprocess.Popen[str]) -> Any:
    out, err = proc.communicate(timeout=DEADLINE_SECONDS)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{err}"
    return json.loads(out.strip().splitlines()[-1])


def test_langgraph_sigkill_after_second_node_resumes_without_rerunning(tmp_path: Path) -> None:
    # The reference: the same graph, uninterrupted, in this process.
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    with WalsyncSaver.from_path(tmp_path / "ref-store") as saver:
        expected = chain_graph(ref_dir).compile(checkpointer=saver).invoke(
            {"value": 1}, config("ref"), durability="sync")
    assert expected == {"value": 27, "log": ["first", "second", "third"]}
    assert read_effects(ref_dir) == ["first", "second", "third"]

    work = tmp_path / "work"
    work.mkdir()
    store = str(tmp_path / "store")
    proc = child("run", store, "t-1", str(work), "--hang-in-third")
    try:
        deadline = time.monotonic() + DEADLINE_SECONDS
        while not (work / "third-started").exists():
            assert proc.poll() is None, f"child exited early: {proc.communicate()[1]}"
            assert time.monotonic() < deadline, "third node never started"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate(timeout=DEADLINE_SECONDS)  # reaps it and closes the pipes
    assert proc.returncode == -signal.SIGKILL
    assert read_effects(work) == ["first", "second", "third"]

    # What the killed process left: the checkpoint after "second", durable.
    with WalsyncSaver.from_path(store) as saver:
        state = chain_graph(work).compile(checkpointer=saver).get_state(config("t-1"))
    assert state.next == ("third",)
    assert state.values == {"value": 20, "log": ["first", "second"]}

    resumed = result_of(child("run", store, "t-1", str(work)))
    assert resumed == expected
    # first and second ran once in all; third ran in the killed process and again.
    assert read_effects(work) == ["first", "second", "third", "third"]


def test_langgraph_interrupt_resumed_by_another_process(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    asked = result_of(child("ask", store, "q-1", str(tmp_path)))
    assert "ship it?" in str(asked["__interrupt__"])
    assert asked["value"] == 2
    assert asked["log"] == ["prepare"]
    assert read_effects(tmp_path) == ["prepare", "ask"]

    answered = result_of(child("answer", store, "q-1", str(tmp_path), "yes"))
    assert answered == {"value": 4, "log": ["prepare", "ask", "finish"], "answer": "yes"}
    # prepare never ran again; ask's body re-runs up to interrupt() (LangGraph's
    # rule: the interrupted node restarts and interrupt() returns the answer).
    assert read_effects(tmp_path) == ["prepare", "ask", "ask", "finish"]
