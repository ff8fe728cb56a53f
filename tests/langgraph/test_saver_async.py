"""The saver's async methods: the sync ones' operations with the commit awaited, no
worker thread, a lock that never blocks the loop, commits that outlive a cancellation."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from tests.langgraph.test_saver_list import cfg, checkpoint, md
from walsync.engine import Store
from walsync.engine.integrations.langgraph import WalsyncSaver


@pytest.fixture
def no_worker_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an async saver method ran in a worker thread")

    monkeypatch.setattr(asyncio, "to_thread", refused)
    monkeypatch.setattr(asyncio.AbstractEventLoop, "run_in_executor", refused)


@pytest.mark.usefixtures("no_worker_threads")
def test_saver_async_methods_await_the_store_without_worker_threads(saver: WalsyncSaver) -> None:
    async def main() -> None:
        stored = []
        for i in range(6):
            stored.append(await saver.aput(
                cfg("t"), checkpoint(f"{i:06d}", {"a": i}, {"a": f"{i:04d}"}), md(i),
                {"a": f"{i:04d}"}))
            await saver.aput_writes(stored[-1], [("a", i), ("__error__", "e")], "task")
            await saver.aput_writes(stored[-1], [("a", -1)], "task")  # a retry keeps the first
        got = await saver.aget_tuple(cfg("t"))
        assert got is not None
        assert got.checkpoint["id"] == "000005"
        assert sorted((w[1], w[2]) for w in got.pending_writes or []) == [
            ("__error__", "e"), ("a", 5)]
        assert [c.checkpoint["id"] async for c in saver.alist(cfg("t"), limit=3)] == [
            "000005", "000004", "000003"]
        await saver.acopy_thread("t", "copy")
        await saver.aprune(["t"], strategy="keep_latest")
        assert [c.checkpoint["id"] async for c in saver.alist(cfg("t"))] == ["000005"]
        assert len([c async for c in saver.alist(cfg("copy"))]) == 6
        await saver.adelete_thread("copy")
        assert await saver.aget_tuple(cfg("copy")) is None

    asyncio.run(main())


def test_saver_aput_cancelled_still_commits_and_holds_off_maintenance(
        saver: WalsyncSaver) -> None:
    async def main() -> None:
        put = asyncio.create_task(saver.aput(cfg("t"), checkpoint("000001", {"a": 1},
                                                                   {"a": "0001"}),
                                             md(1), {"a": "0001"}))
        await asyncio.sleep(0)  # the put's commit is queued, its task awaiting it
        put.cancel()
        with pytest.raises(asyncio.CancelledError):
            await put
        # the lock stays the put's until its commit is done, so the delete reads
        # the thread after the put landed
        await saver.adelete_thread("t")

    asyncio.run(main())
    assert saver.get_tuple(cfg("t")) is None


def test_saver_aput_cancelled_commit_lands(store: Store) -> None:
    saver = WalsyncSaver(store)

    async def main() -> None:
        put = asyncio.create_task(saver.aput(cfg("t"), checkpoint("000001", {"a": 1},
                                                                   {"a": "0001"}),
                                             md(1), {"a": "0001"}))
        await asyncio.sleep(0)
        put.cancel()
        with pytest.raises(asyncio.CancelledError):
            await put

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while saver.get_tuple(cfg("t")) is None and time.monotonic() < deadline:
        time.sleep(0.001)
    got = saver.get_tuple(cfg("t"))
    assert got is not None
    assert got.checkpoint["channel_values"] == {"a": 1}


def test_saver_aput_waits_for_a_threads_maintenance_without_blocking_the_loop(
        saver: WalsyncSaver) -> None:
    """A sync delete holds the lock exclusively in a thread; awaiting puts wait for it
    on the loop, which keeps running other tasks, and go in once it is released."""
    saver.put(cfg("t"), checkpoint("000001", {"a": 1}, {"a": "0001"}), md(1), {"a": "0001"})
    held = threading.Event()
    release = threading.Event()
    real = saver._thread_deletes

    def slow_deletes(thread_id: str) -> Any:
        held.set()
        release.wait(10)
        return real(thread_id)

    saver._thread_deletes = slow_deletes  # type: ignore[method-assign]

    async def main() -> int:
        deleter = threading.Thread(target=saver.delete_thread, args=("t",))
        deleter.start()
        while not held.is_set():
            await asyncio.sleep(0.001)
        puts = [asyncio.create_task(saver.aput(
            cfg("t"), checkpoint(f"{i + 2:06d}", {"a": i}, {"a": f"{i:04d}"}), md(i),
            {"a": f"{i:04d}"})) for i in range(5)]
        ticks = 0
        for _ in range(30):
            await asyncio.sleep(0.001)
            ticks += 1
        assert not any(p.done() for p in puts)
        release.set()
        await asyncio.gather(*puts)
        while deleter.is_alive():
            await asyncio.sleep(0.001)
        return ticks

    assert asyncio.run(main()) == 30
    ids = [c.checkpoint["id"] for c in saver.list(cfg("t"))]
    assert ids == [f"{i + 2:06d}" for i in range(5)][::-1]
