"""LangGraph cases: WalsyncSaver against LangGraph's SqliteSaver, on the same disk, in one run.

    .venv/bin/python -m bench.langgraph_cases            # just these cases (also --quick, --dir)
    .venv/bin/python -m bench.run --only langgraph_put_get,langgraph_graph_20,langgraph_list

``langgraph_put_get``: one thread's checkpoints, each ``put`` with its parent
and a ~1 KiB ``messages`` channel plus a ``step`` channel, both new versions
(so walsync writes three keys, SQLite one row); ``put_writes`` of one task's
two writes (each checkpoint gets about one task's); ``get_tuple`` of the latest (no id:
walsync's reverse scan, SQLite's ``ORDER BY checkpoint_id DESC LIMIT 1``),
with its channel values and pending writes. Latencies interleaved per round.
A put is one fsync for either saver, so the put goal is parity (within the
disk's noise); get_tuple reads four walsync keys or key ranges (each its own
LMDB read transaction) against SQLite's two queries, so its goal is absolute:
it runs once per ``invoke``, next to milliseconds of graph work.

``langgraph_graph_20``: ``invoke`` of a 20-node chain graph (22 checkpoints,
20 ``put_writes``) on a fresh thread, median of the repetitions, with
LangGraph's ``durability="sync"`` (each checkpoint committed before the next
step) and its default ``"async"``.

``langgraph_list``: ``list(config, limit=1)`` on a thread (no
``checkpoint_ns``: every namespace, the call that once read and sorted the
whole thread) of 10 checkpoints and of 1,000, side by side, and the first
item of ``alist`` on the same threads (walsync only: SqliteSaver has no async
methods). Both must cost the same at either length.

Both savers are durable per commit: walsync ``local`` (fdatasync), SQLite in
WAL mode with ``synchronous`` at its default FULL (reported as
``sqlite_pragmas``). LangGraph is imported lazily: without the
``walsync-store[langgraph]`` extra these cases report an error and the others run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import operator
import sqlite3
import statistics
import sys
import time
from typing import Annotated, Any, TypedDict

from .cases import check, fmt, p50_p99, ratio
from .registry import CaseResult, Context, case, describe, interleaved_latency
from .walsync_cases import load_engine

__all__ = ["graph_20", "list_cost", "put_get"]

MESSAGE_BYTES = 1024
GRAPH_NODES = 20


def _savers(ctx: Context, stack: contextlib.ExitStack, errors: dict[str, str]) -> dict[str, Any]:
    """{"walsync": WalsyncSaver, "sqlite": SqliteSaver}, each closed by ``stack``."""
    from langgraph.checkpoint.sqlite import SqliteSaver

    savers: dict[str, Any] = {}
    engine, engine_error = load_engine()
    if engine is None:
        errors["walsync"] = f"skipped: engine did not import ({engine_error})"
    else:
        try:
            from walsync.engine.integrations.langgraph import WalsyncSaver

            savers["walsync"] = stack.enter_context(
                WalsyncSaver.from_path(ctx.subdir("walsync") / "store"))
        except Exception as exc:  # noqa: BLE001 - reported in the case's JSON line
            errors["walsync"] = describe(exc)
    conn = sqlite3.connect(ctx.subdir("sqlite") / "checkpoints.sqlite", check_same_thread=False)
    stack.callback(conn.close)
    sqlite = SqliteSaver(conn)
    sqlite.setup()
    savers["sqlite"] = sqlite
    return savers


def _pragmas(saver: Any) -> dict[str, Any]:
    conn = saver.conn
    return {name: conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("journal_mode", "synchronous")}


class _Checkpoints:
    """put / put_writes / get_tuple on one thread of one saver, as bench targets."""

    def __init__(self, saver: Any, thread_id: str) -> None:
        from langgraph.checkpoint.base import empty_checkpoint

        self.saver = saver
        self.empty = empty_checkpoint
        self.config: Any = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
        self.latest: Any = None
        self.stored: list[Any] = []
        self.version: Any = None
        self.message = "m" * MESSAGE_BYTES

    def put(self, i: int) -> None:
        from langgraph.checkpoint.base.id import uuid6

        self.version = self.saver.get_next_version(self.version, None)
        versions = {"messages": self.version, "step": self.version}
        cp = self.empty()
        cp["id"] = str(uuid6(clock_seq=i))
        cp["channel_values"] = {"messages": [self.message, i], "step": i}
        cp["channel_versions"] = versions
        cp["versions_seen"] = {"node": dict(versions)}
        config = self.latest or self.config
        self.latest = self.saver.put(config, cp, {"source": "loop", "step": i, "parents": {}},
                                     versions)
        self.stored.append(self.latest)

    def put_writes(self, i: int) -> None:
        # spread over the checkpoints, newest first: a few tasks' writes each
        target = self.stored[-1 - i % len(self.stored)]
        self.saver.put_writes(target, [("messages", ["w", i]), ("step", i)], f"task-{i}")

    def get_tuple(self, i: int) -> None:
        if self.saver.get_tuple(self.config) is None:
            raise LookupError("no checkpoint")


class _Op:
    def __init__(self, fn: Any) -> None:
        self.op = fn

    def close(self) -> None:
        return None


@case("langgraph_put_get",
      goal="WalsyncSaver put p50 <= 1.1x SqliteSaver's (file-backed, same run); "
           "get_tuple p50 <= 100 us")
def put_get(ctx: Context) -> CaseResult:
    n, rounds, warmup = ctx.pick((1000, 10, 10), (100, 2, 5))
    errors: dict[str, str] = {}
    f: dict[str, Any] = {"n": n, "message_bytes": MESSAGE_BYTES}
    with contextlib.ExitStack() as stack:
        try:
            savers = _savers(ctx, stack, errors)
        except ImportError as exc:
            return CaseResult({**f, "error": describe(exc)}, errors={"langgraph": describe(exc)})
        f["sqlite_pragmas"] = _pragmas(savers["sqlite"])
        runs = {name: _Checkpoints(saver, "bench") for name, saver in savers.items()}
        samples: dict[str, dict[str, list[int]]] = {}
        for what in ("put", "put_writes", "get_tuple"):
            targets = {name: _Op(getattr(run, what)) for name, run in runs.items()}
            samples[what] = interleaved_latency(targets, n, rounds, warmup, errors,
                                                initial_warmup=warmup)
    for what, got in samples.items():
        for name in ("walsync", "sqlite"):
            f[f"{name}_{what}_p50_us"], f[f"{name}_{what}_p99_us"] = p50_p99(got, name)
        f[f"{what}_ratio_vs_sqlite"] = ratio(f[f"walsync_{what}_p50_us"],
                                             f[f"sqlite_{what}_p50_us"])
    return CaseResult(
        f,
        checks={
            "put p50 <= 1.1x sqlite": check(f["walsync_put_p50_us"],
                                            f["sqlite_put_p50_us"] and
                                            1.1 * f["sqlite_put_p50_us"]),
            "get_tuple p50 <= 100 us": check(f["walsync_get_tuple_p50_us"], 100.0),
        },
        headline=(
            f"put {fmt(f['walsync_put_p50_us'])}/{fmt(f['walsync_put_p99_us'])} us, "
            f"get {fmt(f['walsync_get_tuple_p50_us'])}/{fmt(f['walsync_get_tuple_p99_us'])} us",
            f"sqlite put {fmt(f['sqlite_put_p50_us'])}/{fmt(f['sqlite_put_p99_us'])} us, "
            f"get {fmt(f['sqlite_get_tuple_p50_us'])}/{fmt(f['sqlite_get_tuple_p99_us'])} us",
        ),
        errors=errors,
    )


@case("langgraph_list",
      goal="WalsyncSaver list(limit=1) and alist's first item: p50 on a 1,000-checkpoint "
           "thread <= 1.25x on a 10-checkpoint thread (the same reads)")
def list_cost(ctx: Context) -> CaseResult:
    lengths = (10, 1000)
    n, warmup = ctx.pick((1000, 20), (100, 5))
    errors: dict[str, str] = {}
    f: dict[str, Any] = {"thread_lengths": list(lengths), "n": n}
    loop = asyncio.new_event_loop()
    with contextlib.ExitStack() as stack:
        stack.callback(loop.close)
        try:
            savers = _savers(ctx, stack, errors)
        except ImportError as exc:
            return CaseResult({**f, "error": describe(exc)}, errors={"langgraph": describe(exc)})
        groups: dict[str, dict[int, Any]] = {}
        for name, saver in savers.items():
            for length in lengths:
                thread = f"list-{length}"
                filling = _Checkpoints(saver, thread)
                for i in range(length):
                    filling.put(i)
                config = {"configurable": {"thread_id": thread}}
                groups.setdefault(f"{name}_list", {})[length] = (
                    lambda s=saver, c=config: _expect_one(list(s.list(c, limit=1))))
                if name == "walsync":
                    groups.setdefault(f"{name}_alist", {})[length] = (
                        lambda s=saver, c=config: _expect_one(
                            [loop.run_until_complete(_afirst(s, c))]))
        samples = _alternating(groups, n, warmup, errors)
    for key in samples:
        f[f"{key}_p50_us"], f[f"{key}_p99_us"] = p50_p99(samples, key)
    for key in ("walsync_list", "walsync_alist", "sqlite_list"):
        f[f"{key}_1000_vs_10"] = ratio(f.get(f"{key}_1000_p50_us"), f.get(f"{key}_10_p50_us"))

    def bound(key: str) -> float | None:
        p50 = f.get(f"{key}_10_p50_us")
        return None if p50 is None else 1.25 * p50

    return CaseResult(
        f,
        checks={
            "list(limit=1) 1000 <= 1.25x 10": check(f.get("walsync_list_1000_p50_us"),
                                                     bound("walsync_list")),
            "alist first 1000 <= 1.25x 10": check(f.get("walsync_alist_1000_p50_us"),
                                                   bound("walsync_alist")),
        },
        headline=(
            f"list(limit=1) {fmt(f.get('walsync_list_10_p50_us'))} / "
            f"{fmt(f.get('walsync_list_1000_p50_us'))} us (10 / 1,000 checkpoints), "
            f"alist first {fmt(f.get('walsync_alist_10_p50_us'))} / "
            f"{fmt(f.get('walsync_alist_1000_p50_us'))} us",
            f"sqlite list(limit=1) {fmt(f.get('sqlite_list_10_p50_us'))} / "
            f"{fmt(f.get('sqlite_list_1000_p50_us'))} us",
        ),
        errors=errors,
    )


def _alternating(groups: dict[str, dict[int, Any]], n: int, warmup: int,
                 errors: dict[str, str]) -> dict[str, list[int]]:
    """Latency samples (ns) per ``<group>_<length>``, the lengths of a group
    alternating call by call (which goes first alternating too), groups taking
    turns every call: a noisy machine's drift hits every length alike, so
    the ratio between lengths shows the cost, not the moment."""
    samples: dict[str, list[int]] = {}
    for i in range(warmup + n):
        for group, ops in groups.items():
            if group in errors:
                continue
            order = sorted(ops, reverse=i % 2 == 1)
            for length in order:
                t0 = time.perf_counter_ns()
                try:
                    ops[length]()
                except Exception as exc:  # noqa: BLE001 - reported in the case's JSON line
                    errors[group] = describe(exc)
                    break
                took = time.perf_counter_ns() - t0
                if i >= warmup:
                    samples.setdefault(f"{group}_{length}", []).append(took)
    return {k: v for k, v in samples.items() if k.rsplit("_", 1)[0] not in errors}


def _expect_one(found: list[Any]) -> None:
    if len(found) != 1 or found[0] is None:
        raise LookupError(f"expected one checkpoint, got {found!r}")


async def _afirst(saver: Any, config: Any) -> Any:
    items = saver.alist(config)
    try:
        return await anext(items)
    finally:
        await items.aclose()


class _ChainState(TypedDict):
    value: int
    log: Annotated[list[str], operator.add]


def _chain_graph() -> Any:
    from langgraph.graph import END, START, StateGraph

    builder = StateGraph(_ChainState)
    names = [f"node{i:02d}" for i in range(GRAPH_NODES)]
    for name in names:
        builder.add_node(name, (lambda n: lambda s: {"value": s["value"] + 1, "log": [n]})(name))
    builder.add_edge(START, names[0])
    for a, b in itertools.pairwise(names):
        builder.add_edge(a, b)
    builder.add_edge(names[-1], END)
    return builder


@case("langgraph_graph_20",
      goal="20-node graph invoke with WalsyncSaver <= with SqliteSaver (durability sync)")
def graph_20(ctx: Context) -> CaseResult:
    reps, warmup = ctx.pick((15, 2), (3, 1))
    errors: dict[str, str] = {}
    f: dict[str, Any] = {"nodes": GRAPH_NODES, "reps": reps}
    times: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        try:
            savers = _savers(ctx, stack, errors)
            builder = _chain_graph()
        except ImportError as exc:
            return CaseResult({**f, "error": describe(exc)}, errors={"langgraph": describe(exc)})
        graphs = {name: builder.compile(checkpointer=saver) for name, saver in savers.items()}
        for mode in ("sync", "async"):
            for r in range(warmup + reps):
                order = list(graphs) if r % 2 == 0 else list(reversed(graphs))
                for name in order:
                    key = f"{name}_{mode}"
                    if name in errors:
                        continue
                    config = {"configurable": {"thread_id": f"{mode}-{r}"}}
                    try:
                        t0 = time.perf_counter()
                        result = graphs[name].invoke({"value": 0, "log": []}, config,
                                                     durability=mode)
                        seconds = time.perf_counter() - t0
                    except Exception as exc:  # noqa: BLE001 - reported in the case's JSON line
                        errors[name] = describe(exc)
                        continue
                    if result["value"] != GRAPH_NODES:
                        errors[name] = f"wrong result {result['value']}"
                    elif r >= warmup:
                        times.setdefault(key, []).append(seconds)
    for mode in ("sync", "async"):
        for name in ("walsync", "sqlite"):
            got = times.get(f"{name}_{mode}")
            f[f"{name}_{mode}_ms"] = round(statistics.median(got) * 1000, 2) if got else None
        f[f"{mode}_ratio_vs_sqlite"] = ratio(f[f"walsync_{mode}_ms"], f[f"sqlite_{mode}_ms"])
    return CaseResult(
        f,
        checks={"sync invoke <= sqlite": check(f["walsync_sync_ms"], f["sqlite_sync_ms"])},
        headline=(
            f"sync {fmt(f['walsync_sync_ms'])} ms, async {fmt(f['walsync_async_ms'])} ms",
            f"sqlite sync {fmt(f['sqlite_sync_ms'])} ms, async {fmt(f['sqlite_async_ms'])} ms",
        ),
        errors=errors,
    )


def main(argv: list[str] | None = None) -> int:
    """Run only these cases through bench.run (same output, same options)."""
    from . import run

    return run.main(["--only", "langgraph_put_get,langgraph_graph_20,langgraph_list",
                     *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    # bench.run imports this module by name to register its cases: hand it
    # this very module, so the cases are not registered twice.
    sys.modules["bench.langgraph_cases"] = sys.modules[__name__]
    sys.exit(main())
