"""What ``list`` and ``alist`` cost, the thread index that makes it independent of
the thread's length, and the migration of stores written before that index.

Cost is counted, not timed: every store read (``get``: one row; ``scan`` and
``keys``: the rows they return) goes through a counter, so a 1,000-checkpoint
thread and a 10-checkpoint thread must cost the very same reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import operator
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.checkpoint.base import Checkpoint, CheckpointMetadata, empty_checkpoint
from langgraph.graph import END, START, StateGraph

import walsync.engine.integrations.langgraph as saver_module
from walsync.engine import Delete, FormatVersionError, Put, Store
from walsync.engine.integrations.langgraph import LAYOUT, WalsyncSaver


def cfg(thread_id: str, ns: str | None = "", checkpoint_id: str | None = None) -> Any:
    conf: dict[str, Any] = {"thread_id": thread_id}
    if ns is not None:
        conf["checkpoint_ns"] = ns
    if checkpoint_id is not None:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def checkpoint(checkpoint_id: str, values: dict[str, Any], versions: dict[str, Any]) -> Checkpoint:
    cp = empty_checkpoint()
    cp["id"] = checkpoint_id
    cp["channel_values"] = values
    cp["channel_versions"] = versions
    return cp


def md(step: int) -> CheckpointMetadata:
    return {"source": "loop", "step": step, "parents": {}}


def fill_thread(saver: WalsyncSaver, thread_id: str, n: int) -> list[str]:
    """``n`` checkpoints, each with a channel value and a pending write; every
    other one in a subgraph namespace, as a graph with a subgraph leaves them.
    Ids in order."""
    ids = [f"{i:06d}" for i in range(n)]
    for i, cid in enumerate(ids):
        ns = "child:1" if i % 2 else ""
        stored = saver.put(cfg(thread_id, ns), checkpoint(cid, {"a": i}, {"a": f"{i:04d}"}),
                           md(i), {"a": f"{i:04d}"})
        saver.put_writes(stored, [("a", i)], "task")
    return ids


class Reads:
    """Counts the store reads a saver makes, also through ``store.snapshot()``
    views: calls, and rows read."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.rows = 0
        monkeypatch.setattr(store, "get", self._counted(store.get, lambda _: 1))
        monkeypatch.setattr(store, "scan", self._counted(store.scan, len, materialize=True))
        monkeypatch.setattr(store, "keys", self._counted(store.keys, len))
        snapshot = store.snapshot

        @contextlib.contextmanager
        def counted_snapshot() -> Iterator[Any]:
            with snapshot() as view:
                yield SimpleNamespace(get=self._counted(view.get, lambda _: 1),
                                      scan=self._counted(view.scan, len))

        monkeypatch.setattr(store, "snapshot", counted_snapshot)

    def _counted(self, read: Callable[..., Any], rows: Callable[[Any], int], *,
                 materialize: bool = False) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            got = read(*args, **kwargs)
            if materialize:
                got = list(got)
            self.calls += 1
            self.rows += rows(got)
            return iter(got) if materialize else got
        return counted

    def cost(self, work: Callable[[], Any]) -> tuple[tuple[int, int], Any]:
        self.calls = self.rows = 0
        result = work()
        return (self.calls, self.rows), result


def first(items: Iterator[Any]) -> Any:
    return next(items)


async def afirst(config: Any, saver: WalsyncSaver, **kwargs: Any) -> Any:
    async for item in saver.alist(config, **kwargs):
        return item
    return None


def test_list_limit_1_and_alist_cost_the_same_on_1000_as_on_10_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.open(tmp_path / "store", durability="none") as store:
        saver = WalsyncSaver(store)
        threads = {n: fill_thread(saver, f"t{n}", n) for n in (10, 1000)}
        reads = Reads(store, monkeypatch)
        costs: dict[str, dict[int, tuple[int, int]]] = {}

        def measure(name: str, n: int, work: Callable[[], Any], want: str) -> None:
            cost, got = reads.cost(work)
            got = got[0] if isinstance(got, list) else got
            assert got is not None, (name, n)
            assert got.checkpoint["id"] == want, (name, n)
            costs.setdefault(name, {})[n] = cost

        for n, ids in threads.items():
            t = f"t{n}"
            newest_root = max(c for i, c in enumerate(ids) if i % 2 == 0)
            middle = ids[n // 2]
            measure("list(thread, limit=1)", n,
                    lambda t=t: list(saver.list(cfg(t, None), limit=1)), ids[-1])
            measure("list(thread, ns, limit=1)", n,
                    lambda t=t: list(saver.list(cfg(t), limit=1)), newest_root)
            measure("list(thread, before, limit=1)", n,
                    lambda t=t, m=middle: list(saver.list(cfg(t, None),
                                                          before=cfg(t, "", m), limit=1)),
                    ids[n // 2 - 1])
            measure("first of list(thread)", n,
                    lambda t=t: first(saver.list(cfg(t, None))), ids[-1])
            measure("first of list(thread, ns)", n,
                    lambda t=t: first(saver.list(cfg(t))), newest_root)
            measure("alist(thread, limit=1)", n,
                    lambda t=t: asyncio.run(afirst(cfg(t, None), saver, limit=1)), ids[-1])
            measure("first of alist(thread)", n,
                    lambda t=t: asyncio.run(afirst(cfg(t, None), saver)), ids[-1])
            measure("get_tuple(thread)", n, lambda t=t: saver.get_tuple(cfg(t)), newest_root)
        for name, by_length in costs.items():
            assert by_length[1000] == by_length[10], (name, costs)
        # and the whole list still reads everything, in order
        assert [c.checkpoint["id"] for c in saver.list(cfg("t1000", None))] == \
            threads[1000][::-1]


def test_alist_yields_newest_first_with_filter_and_before(saver: WalsyncSaver) -> None:
    ids = fill_thread(saver, "t", 150)

    async def collect(config: Any, **kwargs: Any) -> list[str]:
        return [c.checkpoint["id"] async for c in saver.alist(config, **kwargs)]

    assert asyncio.run(collect(cfg("t", None))) == ids[::-1]
    assert asyncio.run(collect(cfg("t"))) == [c for i, c in enumerate(ids) if i % 2 == 0][::-1]
    assert asyncio.run(collect(cfg("t", None), filter={"step": 7})) == [ids[7]]
    assert asyncio.run(collect(cfg("t", None), before=cfg("t", "", ids[100]), limit=70)) == \
        ids[:100][::-1][:70]
    assert asyncio.run(collect(cfg("t", None, ids[5]))) == [ids[5]]
    assert asyncio.run(collect(None, limit=3)) == ids[::-1][:3]


# -- the thread index stays whole ----------------------------------------------------


def index_entries(store: Store) -> set[tuple[str, str, str]]:
    return {tuple(v) for _, v in store.scan(".walsync/lg/t/")}  # type: ignore[misc]


def subgraph_checkpoints(store: Store) -> set[tuple[str, str, str]]:
    """What the thread index must hold: every checkpoint outside the root namespace."""
    return {(r["thread_id"], r["checkpoint_ns"], r["checkpoint_id"])
            for _, r in store.scan(".walsync/lg/c/") if r["checkpoint_ns"]}


class Counter(TypedDict):
    value: int
    log: Annotated[list[str], operator.add]


def chain(names: list[str]) -> StateGraph[Any]:
    builder = StateGraph(Counter)
    for name in names:
        builder.add_node(name, (lambda n: lambda s: {"value": s["value"] + 1, "log": [n]})(name))
    builder.add_edge(START, names[0])
    for a, b in itertools.pairwise(names):
        builder.add_edge(a, b)
    builder.add_edge(names[-1], END)
    return builder


def graph_with_subgraph(saver: WalsyncSaver) -> Any:
    """before -> sub (a two-node graph of its own, checkpointed in its own namespace) -> after"""
    builder = StateGraph(Counter)
    builder.add_node("before", lambda s: {"value": s["value"] + 1, "log": ["before"]})
    builder.add_node("sub", chain(["inner1", "inner2"]).compile())
    builder.add_node("after", lambda s: {"value": s["value"] + 1, "log": ["after"]})
    builder.add_edge(START, "before")
    builder.add_edge("before", "sub")
    builder.add_edge("sub", "after")
    builder.add_edge("after", END)
    return builder.compile(checkpointer=saver)


def ids_newest_first(saver: WalsyncSaver, thread_id: str) -> list[str]:
    return [c.checkpoint["id"] for c in saver.list(cfg(thread_id, None))]


def test_thread_list_merges_the_root_and_subgraph_namespaces_by_id(
    saver: WalsyncSaver, store: Store
) -> None:
    graph = graph_with_subgraph(saver)
    graph.invoke({"value": 0}, cfg("t"))
    listed = list(saver.list(cfg("t", None)))
    namespaces = {c.config["configurable"]["checkpoint_ns"] for c in listed}
    assert len(namespaces) == 2
    assert "" in namespaces
    assert [c.checkpoint["id"] for c in listed] == sorted(
        (c for _, _, c in {(r["thread_id"], r["checkpoint_ns"], r["checkpoint_id"])
                           for _, r in store.scan(".walsync/lg/c/")}), reverse=True)
    assert index_entries(store) == subgraph_checkpoints(store) != set()
    assert graph.invoke({"value": 10}, cfg("t"))["value"] == 14
    # one checkpoint by id, without its namespace, from either stream
    for c in listed:
        got = list(saver.list(cfg("t", None, c.checkpoint["id"])))
        assert [g.config for g in got] == [c.config]


def test_every_maintenance_call_keeps_the_thread_index_whole(
    saver: WalsyncSaver, store: Store
) -> None:
    graph = graph_with_subgraph(saver)
    for thread_id in ("a", "b", "c"):
        graph.invoke({"value": 0}, {"configurable": {"thread_id": thread_id,
                                                     "run_id": f"run-{thread_id}"}})
    assert index_entries(store) == subgraph_checkpoints(store)
    assert {t for t, _, _ in index_entries(store)} == {"a", "b", "c"}
    saver.copy_thread("a", "a2")
    assert index_entries(store) == subgraph_checkpoints(store)
    assert ids_newest_first(saver, "a2") == ids_newest_first(saver, "a")
    saver.delete_thread("a")
    assert index_entries(store) == subgraph_checkpoints(store)
    assert store.keys(".walsync/lg/t/a/") == []
    saver.delete_for_runs(["run-b"])
    assert index_entries(store) == subgraph_checkpoints(store)
    assert ids_newest_first(saver, "b") == []
    saver.prune(["c", "a2"])
    assert index_entries(store) == subgraph_checkpoints(store)
    assert [len(ids_newest_first(saver, t)) <= 2 for t in ("c", "a2")] == [True, True]
    assert graph.invoke({"value": 10}, cfg("c"))["value"] == 14


# -- migration from older layouts ----------------------------------------------------


def to_layout_1(store: Store) -> None:
    """Layout 1 is the current layout without the thread index and without
    ``.walsync/lg/layout`` (records, channel values, writes and the run index are the same)."""
    store.commit([Delete(k) for k in [*store.keys(".walsync/lg/t/"), ".walsync/lg/layout"]],
                 internal=True)


def to_layout_2(saver: WalsyncSaver) -> None:
    """Layout 2 indexed root checkpoints too."""
    saver.store.commit([
        *(saver._index_put(r["thread_id"], "", r["checkpoint_id"])
          for _, r in saver.store.scan(".walsync/lg/c/") if not r["checkpoint_ns"]),
        Put(".walsync/lg/layout", 2)], internal=True)


def test_layout_1_store_is_indexed_on_first_use(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "store"
    with WalsyncSaver.from_path(path) as saver:
        ids = fill_thread(saver, "t", 10)
        fill_thread(saver, "u/v", 4)
        expected = index_entries(saver.store)
        to_layout_1(saver.store)
        assert saver.store.keys(".walsync/lg/t/") == []
    monkeypatch.setattr(saver_module, "_MIGRATE_CHUNK", 3)  # several commits
    with WalsyncSaver.from_path(path) as saver:
        assert saver.store.get(".walsync/lg/layout") == LAYOUT
        assert index_entries(saver.store) == expected == subgraph_checkpoints(saver.store)
        assert len(expected) == 7
        assert ids_newest_first(saver, "t") == ids[::-1]
        latest = saver.get_tuple(cfg("t", "child:1"))
        assert latest is not None
        assert latest.checkpoint["channel_values"] == {"a": 9}
        assert latest.pending_writes == [("task", "a", 9)]
        lsn = saver.store.next_lsn
    with WalsyncSaver.from_path(path) as saver:  # nothing left to do: no commit
        assert saver.store.next_lsn == lsn


def test_layout_2_store_drops_its_root_entries(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with WalsyncSaver.from_path(path) as saver:
        ids = fill_thread(saver, "t", 10)
        expected = index_entries(saver.store)
        to_layout_2(saver)
        assert len(index_entries(saver.store)) == 10
        assert len(expected) == 5
    with WalsyncSaver.from_path(path) as saver:
        assert saver.store.get(".walsync/lg/layout") == LAYOUT
        assert index_entries(saver.store) == expected
        assert ids_newest_first(saver, "t") == ids[::-1]


def test_migration_cut_short_is_finished_by_the_next_saver(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with WalsyncSaver.from_path(path) as saver:
        ids = fill_thread(saver, "t", 7)
        to_layout_1(saver.store)
        # as if a migration died after its first commit
        saver.store.commit([saver._index_put("t", "child:1", ids[1])], internal=True)
    with WalsyncSaver.from_path(path) as saver:
        assert index_entries(saver.store) == subgraph_checkpoints(saver.store)
        assert ids_newest_first(saver, "t") == ids[::-1]


@pytest.mark.parametrize("layout", [1, 2])
def test_read_only_old_store_lists_without_the_index(tmp_path: Path, layout: int) -> None:
    path = tmp_path / "store"
    with WalsyncSaver.from_path(path) as saver:
        ids = fill_thread(saver, "t", 7)
        fill_thread(saver, "u", 2)
        if layout == 1:
            to_layout_1(saver.store)
        else:
            to_layout_2(saver)
    with Store.open(path, readonly=True) as store:
        saver = WalsyncSaver(store)
        assert ids_newest_first(saver, "t") == ids[::-1]
        assert [c.checkpoint["id"] for c in saver.list(cfg("t", None), limit=2,
                                                       before=cfg("t", "", ids[3]))] == \
            [ids[2], ids[1]]
        assert [c.checkpoint["id"] for c in saver.list(None, limit=3)] == ids[::-1][:3]


def test_unknown_layout_is_refused(store: Store) -> None:
    store.commit([Put(".walsync/lg/layout", LAYOUT + 1)], internal=True)
    with pytest.raises(FormatVersionError, match=f"key layout {LAYOUT + 1}"):
        WalsyncSaver(store)


def test_a_saver_on_a_fresh_store_writes_nothing_until_its_first_put(store: Store) -> None:
    lsn = store.next_lsn
    saver = WalsyncSaver(store)
    assert store.next_lsn == lsn
    assert store.get(".walsync/lg/layout") is None
    saver.put(cfg("t"), checkpoint("1", {}, {}), md(0), {})
    assert store.next_lsn == lsn + 1
    assert store.get(".walsync/lg/layout") == LAYOUT


def test_migration_needs_no_replicator_for_a_remote_durability_saver(store: Store) -> None:
    # the replicator may be attached after the saver is made
    ids = fill_thread(WalsyncSaver(store), "t", 6)
    to_layout_1(store)
    saver = WalsyncSaver(store, durability="remote")
    assert store.get(".walsync/lg/layout") == LAYOUT
    assert ids_newest_first(saver, "t") == ids[::-1]
