"""WalsyncSaver beyond the conformance suite: durability across reopen, key layout
and escaping, write semantics, collection of channel values, DeltaChannel-aware
prune, copy_thread and the async API under real graphs."""

from __future__ import annotations

import asyncio
import itertools
import operator
import threading
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from hypothesis import given
from hypothesis import strategies as st
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import Checkpoint, CheckpointMetadata, empty_checkpoint
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.checkpoint.serde.types import ERROR
from langgraph.graph import END, START, StateGraph

from walsync.engine import FormatVersionError, Put, Store, StoreClosedError
from walsync.engine.integrations.langgraph import WalsyncSaver, _index_id, _segment, _sortable


def cfg(thread_id: str, ns: str = "", checkpoint_id: str | None = None) -> Any:
    conf: dict[str, Any] = {"thread_id": thread_id, "checkpoint_ns": ns}
    if checkpoint_id is not None:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def checkpoint(checkpoint_id: str, values: dict[str, Any], versions: dict[str, Any]) -> Checkpoint:
    cp = empty_checkpoint()
    cp["id"] = checkpoint_id
    cp["channel_values"] = values
    cp["channel_versions"] = versions
    return cp


def md(step: int, **extra: Any) -> CheckpointMetadata:
    return {"source": "loop", "step": step, "parents": {}, **extra}  # type: ignore[typeddict-item]


class Counter(TypedDict):
    value: int
    log: Annotated[list[str], operator.add]


def counter_graph(steps: int) -> StateGraph[Any]:
    builder = StateGraph(Counter)
    names = [f"step{i:02d}" for i in range(steps)]
    for name in names:
        builder.add_node(name, (lambda n: lambda s: {"value": s["value"] + 1, "log": [n]})(name))
    builder.add_edge(START, names[0])
    for a, b in itertools.pairwise(names):
        builder.add_edge(a, b)
    builder.add_edge(names[-1], END)
    return builder


# -- durability and layout -------------------------------------------------------


def test_saver_checkpoint_and_writes_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with WalsyncSaver.from_path(path) as saver:
        stored = saver.put(cfg("t"), checkpoint("1", {"a": [1, 2]}, {"a": "v1"}), md(0),
                           {"a": "v1"})
        saver.put_writes(stored, [("a", 3), ("b", {"x": b"\x00"})], "task-1", "path")
    with pytest.raises(StoreClosedError):
        saver.get_tuple(cfg("t"))
    with WalsyncSaver.from_path(path) as saver:
        got = saver.get_tuple(cfg("t"))
    assert got is not None
    assert got.checkpoint["channel_values"] == {"a": [1, 2]}
    assert got.pending_writes == [("task-1", "a", 3), ("task-1", "b", {"x": b"\x00"})]
    assert got.config == cfg("t", "", "1")


def test_saver_key_layout_writes_only_what_changed(store: Store, saver: WalsyncSaver) -> None:
    first = saver.put(cfg("t"), checkpoint("1", {"a": "A", "b": "B"}, {"a": "1", "b": "1"}),
                      md(0, run_id="r1"), {"a": "1", "b": "1"})
    saver.put(cfg("t", "", "1"), checkpoint("2", {"a": "A2", "b": "B"}, {"a": "2", "b": "1"}),
              md(1, run_id="r1"), {"a": "2"})
    saver.put_writes(first, [("a", "w")], "task")
    assert store.keys(".walsync/lg/") == [
        ".walsync/lg/b/t//a/1", ".walsync/lg/b/t//a/2", ".walsync/lg/b/t//b/1",
        ".walsync/lg/c/t//1", ".walsync/lg/c/t//2",
        ".walsync/lg/layout",
        ".walsync/lg/r/r1/t//1", ".walsync/lg/r/r1/t//2",
        ".walsync/lg/w/t//1/task/0",
    ]
    latest = saver.get_tuple(cfg("t"))
    assert latest is not None
    assert latest.checkpoint["channel_values"] == {"a": "A2", "b": "B"}
    assert latest.parent_config == cfg("t", "", "1")


def test_saver_escapes_slashes_and_keeps_id_order(saver: WalsyncSaver, store: Store) -> None:
    ids = ["a/1", "a.1", "a-1", "a0", "a/", "a."]
    for thread in ("x/y%z", "x", "x/y"):
        for i, cid in enumerate(ids):
            saver.put(cfg(thread, "ns/1"), checkpoint(cid, {}, {}), md(i), {})
            saver.put_writes(cfg(thread, "ns/1", cid), [("ch", thread)], "t/1")
    for thread in ("x/y%z", "x", "x/y"):
        listed = [t.checkpoint["id"] for t in saver.list(cfg(thread, "ns/1"))]
        assert listed == sorted(ids, reverse=True)
        latest = saver.get_tuple(cfg(thread, "ns/1"))
        assert latest is not None
        assert latest.checkpoint["id"] == max(ids)
        assert latest.pending_writes == [("t/1", "ch", thread)]
        before = [t.checkpoint["id"] for t in saver.list(cfg(thread, "ns/1"),
                                                         before=cfg(thread, "ns/1", "a/"))]
        assert before == sorted((i for i in ids if i < "a/"), reverse=True)
        whole = {"configurable": {"thread_id": thread}}
        assert [t.checkpoint["id"] for t in saver.list(whole)] == sorted(ids, reverse=True)
        assert [t.checkpoint["id"] for t in saver.list(whole, before=cfg(thread, "", "a/"))] == \
            before
    slashes = {"b": 6, "c": 5, "w": 7, "t": 4}
    assert all(k.count("/") == slashes[k[len(saver.root)]]
               for k in store.keys(saver.root) if k != f"{saver.root}layout")


def test_saver_hashes_long_segments(saver: WalsyncSaver, store: Store) -> None:
    long_ns = "|".join(f"subgraph:{i:032d}" for i in range(20))
    saver.put(cfg("t", long_ns), checkpoint("1", {"a": 1}, {"a": "1"}), md(0), {"a": "1"})
    got = saver.get_tuple(cfg("t", long_ns))
    assert got is not None
    assert got.config["configurable"]["checkpoint_ns"] == long_ns
    assert got.checkpoint["channel_values"] == {"a": 1}
    assert max(len(k.encode()) for k in store.keys(".walsync/lg/")) < 200


@given(st.text(), st.text())
def test_sortable_preserves_order_and_segment_is_injective(a: str, b: str) -> None:
    assert (a < b) == (_sortable(a) < _sortable(b))
    assert "/" not in _sortable(a)
    assert "/" not in _segment(a)
    assert (a == b) == (_segment(a) == _segment(b))


@given(st.text(), st.text(), st.text(), st.text())
def test_index_id_sorts_like_the_id_whatever_follows(a: str, b: str, x: str, y: str) -> None:
    # a thread index key is <id>!<ns>: ids that are prefixes of others, and
    # characters below '/', must not let the namespace decide the order
    assert "/" not in _index_id(a)
    assert "!" not in _index_id(a)
    if a != b:
        assert (a < b) == (f"{_index_id(a)}!{x}" < f"{_index_id(b)}!{y}")
        assert (a < b) == (f"{_index_id(a)}!{x}" < _index_id(b))


def test_saver_refuses_unknown_record_format(saver: WalsyncSaver, store: Store) -> None:
    saver.put(cfg("t"), checkpoint("1", {}, {}), md(0), {})
    record = store.get(".walsync/lg/c/t//1")
    store.commit([Put(".walsync/lg/c/t//1", {**record, "format": 99})], internal=True)
    with pytest.raises(FormatVersionError, match="format 99"):
        saver.get_tuple(cfg("t"))


def test_saver_uses_the_given_serializer(store: Store) -> None:
    calls: list[str] = []

    class Recording(JsonPlusSerializer):
        def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
            calls.append("dumps")
            return super().dumps_typed(obj)

        def loads_typed(self, data: tuple[str, bytes]) -> Any:
            calls.append("loads")
            return super().loads_typed(data)

    saver = WalsyncSaver(store, serde=Recording())
    saver.put(cfg("t"), checkpoint("1", {"a": 1}, {"a": "1"}), md(0), {"a": "1"})
    assert calls.count("dumps") == 3  # the channel value, the checkpoint, the metadata
    got = saver.get_tuple(cfg("t"))
    assert got is not None
    assert got.checkpoint["channel_values"] == {"a": 1}
    assert calls.count("loads") == 3


# -- semantics -------------------------------------------------------------------


def test_saver_put_writes_keeps_regular_and_overwrites_special(saver: WalsyncSaver) -> None:
    stored = saver.put(cfg("t"), checkpoint("1", {}, {}), md(0), {})
    saver.put_writes(stored, [("ch", "first"), (ERROR, "boom-1")], "task")
    saver.put_writes(stored, [("ch", "second"), ("other", 2), (ERROR, "boom-2")], "task")
    got = saver.get_tuple(stored)
    assert got is not None
    assert got.pending_writes == [("task", ERROR, "boom-2"), ("task", "ch", "first"),
                                  ("task", "other", 2)]


def test_saver_put_writes_from_racing_threads_keeps_one(saver: WalsyncSaver) -> None:
    stored = saver.put(cfg("t"), checkpoint("1", {}, {}), md(0), {})
    barrier = threading.Barrier(8)

    def write(i: int) -> None:
        barrier.wait()
        saver.put_writes(stored, [("ch", i)], "task")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = saver.get_tuple(stored)
    assert got is not None
    assert got.pending_writes is not None
    assert len(got.pending_writes) == 1
    assert got.pending_writes[0][2] in range(8)


def test_saver_list_across_namespaces_and_threads_newest_first(saver: WalsyncSaver) -> None:
    saver.put(cfg("t1", ""), checkpoint("1", {}, {}), md(0), {})
    saver.put(cfg("t1", "child:a"), checkpoint("3", {}, {}), md(1, kind="sub"), {})
    saver.put(cfg("t1", ""), checkpoint("4", {}, {}), md(2), {})
    saver.put(cfg("t2", ""), checkpoint("2", {}, {}), md(0, kind="sub"), {})
    thread = {"configurable": {"thread_id": "t1"}}
    assert [t.checkpoint["id"] for t in saver.list(thread)] == ["4", "3", "1"]
    assert [t.checkpoint["id"] for t in saver.list(None)] == ["4", "3", "2", "1"]
    assert [t.checkpoint["id"] for t in saver.list(None, filter={"kind": "sub"})] == ["3", "2"]
    assert [t.checkpoint["id"] for t in saver.list(None, before=cfg("x", "", "3"),
                                                   limit=1)] == ["2"]
    assert [t.config["configurable"]["checkpoint_ns"] for t in saver.list(thread)] == [
        "", "child:a", ""]
    assert list(saver.list(thread, limit=0)) == []


def test_saver_list_pages_through_long_threads(saver: WalsyncSaver) -> None:
    ids = [f"{i:04d}" for i in range(150)]
    for i, cid in enumerate(ids):
        saver.put(cfg("t"), checkpoint(cid, {}, {}), md(i, even=i % 2 == 0), {})
    listed = [t.checkpoint["id"] for t in saver.list(cfg("t"), filter={"even": True})]
    assert listed == [c for c in reversed(ids) if int(c) % 2 == 0]
    assert [t.checkpoint["id"] for t in saver.list(cfg("t"), limit=70)] == ids[::-1][:70]


def test_saver_delete_for_runs_collects_only_unreferenced_values(
    saver: WalsyncSaver, store: Store
) -> None:
    one = saver.put(cfg("t"), checkpoint("1", {"a": "A"}, {"a": "1"}), md(0, run_id="r1"),
                    {"a": "1"})
    saver.put_writes(one, [("a", "w")], "task")
    saver.put(cfg("t", "", "1"), checkpoint("2", {"a": "A", "b": "B"}, {"a": "1", "b": "1"}),
              md(1, run_id="r2"), {"b": "1"})
    saver.delete_for_runs(["r1"])
    assert store.keys(".walsync/lg/") == [
        ".walsync/lg/b/t//a/1", ".walsync/lg/b/t//b/1", ".walsync/lg/c/t//2",
        ".walsync/lg/layout", ".walsync/lg/r/r2/t//2"]
    got = saver.get_tuple(cfg("t"))
    assert got is not None
    assert got.checkpoint["channel_values"] == {"a": "A", "b": "B"}
    saver.delete_for_runs(["r2"])
    assert store.keys(".walsync/lg/") == [".walsync/lg/layout"]


def test_saver_prune_keep_latest_collects_values(saver: WalsyncSaver, store: Store) -> None:
    graph = counter_graph(3).compile(checkpointer=saver)
    graph.invoke({"value": 0}, cfg("t"))
    assert len(list(saver.list(cfg("t")))) == 5
    saver.prune(["t"])
    assert len(list(saver.list(cfg("t")))) == 1
    latest = saver.get_tuple(cfg("t"))
    assert latest is not None
    wanted = {f".walsync/lg/b/t//{ch}/{v}"
              for ch, v in latest.checkpoint["channel_versions"].items()}
    assert set(store.keys(".walsync/lg/b/")) <= wanted
    assert graph.invoke({"value": 10}, cfg("t")) == {
        "value": 13, "log": ["step00", "step01", "step02"] * 2}
    with pytest.raises(ValueError, match="unknown prune strategy"):
        saver.prune(["t"], strategy="keep_oldest")


def _concat(state: list[str], writes: list[list[str]]) -> list[str]:
    return state + [x for w in writes for x in w]


class Items(TypedDict):
    items: Annotated[list[str], DeltaChannel(_concat, snapshot_frequency=3)]


def test_saver_prune_keeps_delta_channel_ancestors(saver: WalsyncSaver) -> None:
    builder = StateGraph(Items)
    names = [f"n{i}" for i in range(4)]
    for name in names:
        builder.add_node(name, (lambda n: lambda s: {"items": [n]})(name))
    builder.add_edge(START, names[0])
    for a, b in itertools.pairwise(names):
        builder.add_edge(a, b)
    builder.add_edge(names[-1], END)
    graph = builder.compile(checkpointer=saver)
    expected = ["in", "n0", "n1", "n2", "n3"]
    assert graph.invoke({"items": ["in"]}, cfg("t")) == {"items": expected}
    latest = saver.get_tuple(cfg("t"))
    assert latest is not None
    assert "counters_since_delta_snapshot" in latest.metadata
    saver.prune(["t"])
    # the latest is no snapshot: it needs its ancestors back to the last one
    assert 1 < len(list(saver.list(cfg("t")))) < 6
    assert graph.get_state(cfg("t")).values == {"items": expected}
    assert graph.invoke({"items": ["more"]}, cfg("t")) == {"items": [*expected, "more", *names]}


def test_saver_copy_thread_then_both_threads_go_on(saver: WalsyncSaver) -> None:
    graph = counter_graph(2).compile(checkpointer=saver)
    graph.invoke({"value": 0}, cfg("src"))
    saver.copy_thread("src", "dst")
    assert graph.invoke({"value": 100}, cfg("dst")) == {
        "value": 102, "log": ["step00", "step01"] * 2}
    assert graph.get_state(cfg("src")).values == {"value": 2, "log": ["step00", "step01"]}
    saver.delete_thread("src")
    assert saver.get_tuple(cfg("src")) is None
    assert graph.get_state(cfg("dst")).values["value"] == 102


def test_saver_async_graph_matches_sync_graph(saver: WalsyncSaver) -> None:
    graph = counter_graph(5).compile(checkpointer=saver)
    sync_result = graph.invoke({"value": 0}, cfg("sync"))

    async def run() -> Any:
        result = await graph.ainvoke({"value": 0}, cfg("async"))
        history = [t async for t in saver.alist(cfg("async"))]
        return result, history

    async_result, history = asyncio.run(run())
    assert async_result == sync_result == {"value": 5, "log": [f"step{i:02d}" for i in range(5)]}
    assert len(history) == 7
    assert [t.metadata["step"] for t in history] == list(range(5, -2, -1))


def test_saver_prune_while_graphs_run_keeps_every_thread_whole(saver: WalsyncSaver) -> None:
    graph = counter_graph(4).compile(checkpointer=saver)
    threads = [f"w{i}" for i in range(4)]
    errors: list[BaseException] = []

    def drive(thread_id: str) -> None:
        try:
            for _ in range(3):
                graph.invoke({"value": 0}, cfg(thread_id), durability="sync")
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test below
            errors.append(exc)

    workers = [threading.Thread(target=drive, args=(t,)) for t in threads]
    for w in workers:
        w.start()
    prunes = 0
    while any(w.is_alive() for w in workers) or prunes == 0:
        saver.prune(threads)
        prunes += 1
    for w in workers:
        w.join()
    assert errors == []
    for thread_id in threads:
        assert graph.get_state(cfg(thread_id)).values == {
            "value": 4, "log": [f"step{i:02d}" for i in range(4)] * 3}
    saver.prune(threads)
    assert [len(list(saver.list(cfg(t)))) for t in threads] == [1, 1, 1, 1]
