"""LangGraph graphs on a walsync store, driven in a child process the parent may SIGKILL.

    python -m tests.langgraph._graph_child run STORE THREAD WORKDIR [--hang-in-third]
        invokes the three-node graph first -> second -> third on THREAD
        (input {"value": 1}, or None to resume when the thread has a
        checkpoint). With --hang-in-third, third's body creates
        WORKDIR/third-started and sleeps until the parent kills it.

    python -m tests.langgraph._graph_child ask STORE THREAD WORKDIR
        invokes prepare -> ask -> finish; ask calls interrupt(), so the
        invoke returns with the interrupt pending.

    python -m tests.langgraph._graph_child answer STORE THREAD WORKDIR ANSWER
        resumes that thread with Command(resume=ANSWER).

Every node body first appends its name to WORKDIR/effects (fsync'ed), so the
parent counts how often each body ran across processes. The last line on
stdout is the invoke's result as JSON. Every invoke uses durability="sync":
each checkpoint is committed before the next step starts.
"""

from __future__ import annotations

import json
import operator
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from walsync.engine.integrations.langgraph import WalsyncSaver

HANG_SECONDS = 60.0


class State(TypedDict, total=False):
    value: int
    log: Annotated[list[str], operator.add]
    answer: str


def record_effect(workdir: Path, name: str) -> None:
    """The node's side effect: one fsync'ed line, so a SIGKILL cannot lose it."""
    fd = os.open(workdir / "effects", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{name}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_effects(workdir: Path) -> list[str]:
    path = workdir / "effects"
    return path.read_text().split() if path.exists() else []


def chain_graph(workdir: Path, *, hang_in_third: bool = False) -> StateGraph[Any]:
    def first(state: State) -> State:
        record_effect(workdir, "first")
        return {"value": state["value"] + 1, "log": ["first"]}

    def second(state: State) -> State:
        record_effect(workdir, "second")
        return {"value": state["value"] * 10, "log": ["second"]}

    def third(state: State) -> State:
        record_effect(workdir, "third")
        if hang_in_third:
            (workdir / "third-started").touch()
            time.sleep(HANG_SECONDS)
        return {"value": state["value"] + 7, "log": ["third"]}

    builder = StateGraph(State)
    builder.add_node("first", first)
    builder.add_node("second", second)
    builder.add_node("third", third)
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    builder.add_edge("second", "third")
    builder.add_edge("third", END)
    return builder


def question_graph(workdir: Path) -> StateGraph[Any]:
    def prepare(state: State) -> State:
        record_effect(workdir, "prepare")
        return {"value": state["value"] + 1, "log": ["prepare"]}

    def ask(state: State) -> State:
        record_effect(workdir, "ask")
        answer = interrupt({"question": "ship it?", "value": state["value"]})
        return {"answer": str(answer), "log": ["ask"]}

    def finish(state: State) -> State:
        record_effect(workdir, "finish")
        return {"value": state["value"] * 2, "log": ["finish"]}

    builder = StateGraph(State)
    builder.add_node("prepare", prepare)
    builder.add_node("ask", ask)
    builder.add_node("finish", finish)
    builder.add_edge(START, "prepare")
    builder.add_edge("prepare", "ask")
    builder.add_edge("ask", "finish")
    builder.add_edge("finish", END)
    return builder


def config(thread_id: str) -> Any:
    return {"configurable": {"thread_id": thread_id}}


def main(argv: list[str]) -> int:
    command, store_path, thread_id, workdir_arg = argv[:4]
    workdir = Path(workdir_arg)
    with WalsyncSaver.from_path(store_path) as saver:
        cfg = config(thread_id)
        if command == "run":
            graph = chain_graph(workdir, hang_in_third="--hang-in-third" in argv).compile(
                checkpointer=saver)
            started = saver.get_tuple(cfg) is not None
            result = graph.invoke(None if started else {"value": 1}, cfg, durability="sync")
        elif command == "ask":
            graph = question_graph(workdir).compile(checkpointer=saver)
            result = graph.invoke({"value": 1}, cfg, durability="sync")
        elif command == "answer":
            graph = question_graph(workdir).compile(checkpointer=saver)
            result = graph.invoke(Command(resume=argv[4]), cfg, durability="sync")
        else:
            print(f"unknown command {command!r}", file=sys.stderr)
            return 2
    print(json.dumps(result, default=repr), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
