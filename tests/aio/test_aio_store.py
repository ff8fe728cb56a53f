"""The awaitable store: the sync store's semantics, awaited (engine/aio.py)."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from walsync.engine import Store, verify
from walsync.engine.aio import AsyncStore, submit
from walsync.engine.errors import (
    ConflictError,
    InvalidKeyError,
    InvalidValueError,
    NoReplicatorError,
    RemoteDurabilityTimeoutError,
    StoreClosedError,
    WalsyncError,
)
from walsync.engine.events import CommitEvent
from walsync.engine.ops import Delete, Put


def test_aio_put_get_delete_and_versions_match_the_sync_store(astore: AsyncStore) -> None:
    async def main() -> None:
        first = await astore.put("a", {"n": 1})
        assert astore.get("a") == {"n": 1}
        version = astore.get_version("a")
        assert version is not None
        assert version.lsn == first.lsn
        second = await astore.put("a", {"n": 2}, expect=version)
        assert second.lsn == first.lsn + 1
        with pytest.raises(ConflictError):
            await astore.put("a", {"n": 3}, expect=version)
        with pytest.raises(ConflictError):
            await astore.put("b", 1, expect=astore.get_version("a"))
        await astore.put("b", 1, expect=None)
        await astore.delete("a")
        assert astore.get("a") is None
        assert astore.keys() == ["b"]

    asyncio.run(main())
    # nothing the refused commits held was written
    assert astore.store.next_lsn == 5


def test_aio_refusals_raise_before_anything_is_queued(astore: AsyncStore) -> None:
    async def main() -> None:
        with pytest.raises(InvalidKeyError):
            await astore.put("", 1)
        with pytest.raises(InvalidKeyError):
            await astore.put(".walsync/runs/x", 1)
        with pytest.raises(NoReplicatorError):
            await astore.put("k", 1, durability="remote")
        with pytest.raises(ValueError, match="at least one operation"):
            await astore.commit([])
        with pytest.raises(InvalidValueError):
            await astore.put("k", object())

    asyncio.run(main())
    assert astore.store.next_lsn == 1
    assert astore.get("k") is None


def test_aio_batch_commits_all_or_nothing(astore: AsyncStore) -> None:
    async def main() -> None:
        async with astore.batch() as b:
            b.put("x", 1)
            b.put("y", 2)
            b.delete("z")
        assert b.result is not None
        assert (astore.get("x"), astore.get("y")) == (1, 2)

        async def discarded() -> None:
            async with astore.batch() as b2:
                b2.put("x", 100)
                raise RuntimeError("discarded")

        with pytest.raises(RuntimeError):
            await discarded()

        async def conflicting() -> None:  # a conflict on one key refuses the whole batch
            async with astore.batch() as b3:
                b3.put("w", 1)
                b3.put("x", 2, expect=None)

        with pytest.raises(ConflictError):
            await conflicting()
        assert astore.get("w") is None
        assert astore.get("x") == 1

    asyncio.run(main())


def test_aio_durability_none_commits_without_sync_until_flush(
        astore: AsyncStore, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])

    async def main() -> None:
        result = await astore.put("k", b"v", durability="none")
        assert result.durability.value == "none"
        assert synced == []
        await astore.put("k2", b"v")
        assert synced

    asyncio.run(main())


def _mixed_round(path: Path, rng: random.Random) -> dict[str, int]:
    astore = AsyncStore.open(path)
    lsns: dict[str, int] = {}
    lock = threading.Lock()

    def thread_commits(t: int, n: int) -> None:
        for i in range(n):
            key = f"t{t}/{i}"
            r = astore.store.put(key, {"t": t, "i": i})
            with lock:
                lsns[key] = r.lsn

    async def task_commits(t: int, n: int, pause: float) -> None:
        for i in range(n):
            key = f"a{t}/{i}"
            if i % 3 == 0:
                async with astore.batch() as b:
                    b.put(key, {"t": t, "i": i})
                    b.put(key + "/twin", i)
                assert b.result is not None
                lsns[key] = b.result.lsn
            else:
                lsns[key] = (await astore.put(key, {"t": t, "i": i})).lsn
            if pause:
                await asyncio.sleep(pause)

    async def main() -> None:
        threads = [threading.Thread(target=thread_commits, args=(t, rng.randint(20, 60)))
                   for t in range(rng.randint(1, 4))]
        for th in threads:
            th.start()
        await asyncio.gather(*(task_commits(t, rng.randint(20, 80), rng.choice([0, 0, 0.0005]))
                               for t in range(rng.randint(1, 16))))
        for th in threads:
            await asyncio.to_thread(th.join)

    try:
        asyncio.run(main())
    finally:
        astore.close()
    return lsns


def test_aio_commits_from_tasks_and_threads_share_the_group_commit(store_path: Path) -> None:
    """Random interleavings of awaited and blocking commits: every one lands, once, in
    LSN order, with its value; the store verifies clean after reopening."""
    rng = random.Random(11)
    for round_ in range(3):
        path = store_path.parent / f"mixed{round_}"
        lsns = _mixed_round(path, rng)
        assert len(set(lsns.values())) == len(lsns)
        with Store.open(path) as s:
            for key, lsn in lsns.items():
                kind, rest = key[0], key[1:]
                t, i = (int(x) for x in rest.split("/"))
                assert s.get(key) == {"t": t, "i": i}, key
                version = s.get_version(key)
                assert version is not None
                assert version.lsn == lsn
                if kind == "a" and i % 3 == 0:
                    assert s.get(key + "/twin") == i
        assert verify(path).ok


def test_aio_cancelled_awaiters_never_cancel_nor_half_apply_a_commit(store_path: Path) -> None:
    """Tasks committing batches are cancelled at random moments (before their submit,
    while their record is queued, written or applied): each batch is whole or absent,
    every batch whose submit returned is there, and the store verifies clean."""
    rng = random.Random(7)
    astore = AsyncStore.open(store_path)
    submitted: dict[int, int] = {}
    keys_of: dict[int, list[str]] = {}
    total = 400

    async def one(n: int) -> None:
        await asyncio.sleep(n * 0.0001 + rng.choice([0, 0, 0.0001, 0.0003]))
        keys_of[n] = [f"b{n}/{j}" for j in range(rng.randint(1, 5))]
        result, done = submit(astore.store, [Put(k, {"batch": n}) for k in keys_of[n]])
        submitted[n] = result.lsn
        task = asyncio.current_task()
        assert task is not None
        after = rng.random()
        if after < 0.3:  # while its record is queued, written or being applied
            asyncio.get_running_loop().call_later(rng.uniform(0, 0.0005), task.cancel)
        elif after < 0.4:
            asyncio.get_running_loop().call_soon(task.cancel)
        await done

    async def main() -> list[BaseException | None]:
        loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(one(n)) for n in range(total)]
        for n, task in enumerate(tasks):
            if rng.random() < 0.6:  # around its submit: before, at, or while it waits
                loop.call_later(max(0.0, n * 0.0001 + rng.uniform(-0.002, 0.002)), task.cancel)
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    astore.close()
    cancelled = {n for n, r in enumerate(results) if isinstance(r, asyncio.CancelledError)}
    assert all(r is None for n, r in enumerate(results) if n not in cancelled)
    before_submit = cancelled - submitted.keys()
    while_waiting = cancelled & submitted.keys()
    assert len(before_submit) > 20, f"{len(before_submit)} cancelled before their submit"
    assert len(while_waiting) > 20, f"{len(while_waiting)} cancelled while awaiting"
    with Store.open(store_path) as s:
        for n in range(total):
            keys = keys_of.get(n, [f"b{n}/0"])
            present = [s.get(k) for k in keys]
            if n in submitted:
                assert present == [{"batch": n}] * len(keys), f"batch {n} not whole"
                version = s.get_version(keys[0])
                assert version is not None
                assert version.lsn == submitted[n]
            else:
                assert present == [None] * len(keys), f"batch {n} applied without its submit"
        assert s.next_lsn == len(submitted) + 1
    assert verify(store_path).ok


def test_aio_failed_sync_fails_the_awaited_commits_and_stops_the_store(
        store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    astore = AsyncStore.open(store_path)
    real = os.fdatasync
    failing = threading.Event()

    def fdatasync(fd: int) -> None:
        if failing.is_set():
            raise OSError(errno.EIO, "injected fdatasync failure")
        real(fd)

    async def main() -> list[Any]:
        await astore.put("before", 1)
        failing.set()
        return await asyncio.gather(*(astore.put(f"k{i}", i) for i in range(20)),
                                    return_exceptions=True)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    results = asyncio.run(main())
    assert all(isinstance(r, WalsyncError) for r in results), results
    assert astore.store.poisoned is not None
    with pytest.raises(WalsyncError):
        asyncio.run(astore.put("after", 1))
    monkeypatch.setattr(os, "fdatasync", real)
    astore.close()
    with Store.open(store_path) as s:
        assert s.get("before") == 1
        assert s.get("after") is None


def test_aio_close_waits_for_queued_commits_and_then_refuses(store_path: Path) -> None:
    astore = AsyncStore.open(store_path)

    async def main() -> None:
        futures = [submit(astore.store, [Put(f"k{i}", i)])[1] for i in range(50)]
        await asyncio.to_thread(astore.close)
        await asyncio.gather(*futures)
        with pytest.raises(StoreClosedError):
            await astore.put("late", 1)

    asyncio.run(main())
    with Store.open(store_path) as s:
        assert [s.get(f"k{i}") for i in range(50)] == list(range(50))


class _GatedAcknowledger:
    """A replicator stand-in: acknowledges up to what the test allows."""

    def __init__(self) -> None:
        self.allowed = 0
        self.cv = threading.Condition()

    def allow(self, lsn: int) -> None:
        with self.cv:
            self.allowed = lsn
            self.cv.notify_all()

    def wait_acknowledged(self, lsn: int, timeout_seconds: float) -> None:
        with self.cv:
            if not self.cv.wait_for(lambda: self.allowed >= lsn, timeout_seconds):
                raise RemoteDurabilityTimeoutError(lsn, timeout_seconds)


def test_aio_remote_durability_is_awaited_without_blocking_the_loop(store_path: Path) -> None:
    astore = AsyncStore.open(store_path, remote_timeout_seconds=2.0)
    ack = _GatedAcknowledger()
    astore.store.attach_replicator(ack)

    async def main() -> None:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        ticker = asyncio.create_task(tick())
        pending = asyncio.create_task(astore.put("r", 1, durability="remote"))
        deadline = time.monotonic() + 1.5
        while (ticks <= 10 or astore.get("r") is None) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)  # the loop runs meanwhile
        assert ticks > 10
        assert astore.get("r") == 1  # durable here, not yet acknowledged
        assert not pending.done()
        ack.allow(astore.store.next_lsn - 1)
        result = await asyncio.wait_for(pending, 5)
        assert result.durability.value == "remote"
        with pytest.raises(RemoteDurabilityTimeoutError):
            await astore.put("late", 2, durability="remote")
        ticker.cancel()

    asyncio.run(main())
    astore.store.detach_replicator(ack)
    astore.close()


def test_aio_remote_durability_through_a_replicator(store_path: Path) -> None:
    from walsync.sync.memory import MemoryServer
    from walsync.sync.replicator import Replicator, ReplicatorOptions

    server = MemoryServer()
    astore = AsyncStore.open(store_path, remote_timeout_seconds=1.0)
    rep = Replicator(astore.store, server.transport(),
                     ReplicatorOptions(pull=False, batch_wait_seconds=0)).start()
    try:
        async def main() -> None:
            results = await asyncio.gather(
                *(astore.put(f"k{i}", i, durability="remote") for i in range(30)))
            assert all(r.durability.value == "remote" for r in results)
            assert {f"k{i}" for i in range(30)} <= set(server.state())
            server.stop()
            with pytest.raises(WalsyncError):
                await astore.put("unshipped", 1, durability="remote")
            assert astore.get("unshipped") == 1

        asyncio.run(main())
    finally:
        server.start()
        rep.stop()
        astore.close()


def test_aio_events_iterate_with_async_for_in_commit_order(astore: AsyncStore) -> None:
    async def main() -> list[int]:
        got: list[int] = []
        sub = astore.events(kinds=("commit",))

        async def consume() -> None:
            async for event in sub:
                assert isinstance(event, CommitEvent)
                got.append(event.lsn)

        consumer = asyncio.create_task(consume())
        await asyncio.gather(*(astore.put(f"k{i}", i) for i in range(100)))
        await astore.commit([Put("x", 1), Delete("k0")])
        deadline = time.monotonic() + 10
        while len(got) < 101 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        sub.close()  # ends the iteration
        await asyncio.wait_for(consumer, 5)
        return got

    got = asyncio.run(main())
    assert got == list(range(1, 102))


def test_aio_events_iteration_ends_when_the_store_closes(store_path: Path) -> None:
    astore = AsyncStore.open(store_path)

    async def main() -> list[Any]:
        async with astore.subscribe(kinds=("commit",)) as sub:
            consumer: asyncio.Task[list[Any]] = asyncio.create_task(_collect(sub))
            await astore.put("a", 1)
            await asyncio.to_thread(astore.close)
            return await asyncio.wait_for(consumer, 10)

    events = asyncio.run(main())
    assert [e.lsn for e in events] == [1]


async def _collect(sub: Any) -> list[Any]:
    return [e async for e in sub]


def test_aio_store_and_sync_store_are_one(store_path: Path) -> None:
    with Store.open(store_path) as s:
        a = AsyncStore(s)
        asyncio.run(a.put("k", 1))
        assert s.get("k") == 1
        s.put("k", 2)
        assert a.get("k") == 2
        assert a.path == s.path


_WORKER = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from walsync.engine.handoff import SyncLock, SyncFile\n"
    "root = Path(sys.argv[1])\n"
    "SyncLock(root).acquire('test')\n"
    "f = SyncFile(root)\n"
    "f.update(acked_lsn=0, retain_floor=1, sync_retain=True)\n"
    "print('ready', flush=True)\n"
    "sys.stdin.readline()\n"
    "time.sleep(0.3)\n"
    "f.update(acked_lsn=int(sys.argv[2]), retain_floor=int(sys.argv[2]) + 1)\n"
    "time.sleep(60)\n"
)


def test_aio_remote_durability_acknowledged_by_a_sync_worker_process(store_path: Path) -> None:
    """With the replicator in another process (engine/handoff.py), an awaited 'remote'
    commit returns once the worker acknowledges its LSN, as a blocking one does."""
    with Store.open(store_path) as s:
        s.put("local", 1)
        first = s.next_lsn
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(store_path), str(first)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        astore = AsyncStore.open(store_path, create=False)

        async def main() -> float:
            pending = asyncio.create_task(astore.put("k", 1, durability="remote"))
            await asyncio.sleep(0.05)
            assert not pending.done()
            started = time.monotonic()
            proc.stdin.write("go\n")
            proc.stdin.flush()
            result = await asyncio.wait_for(pending, 10)
            assert result.lsn == first
            return time.monotonic() - started

        try:
            assert 0.2 < asyncio.run(main()) < 5.0
        finally:
            astore.close()
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def test_aio_events_async_iteration_reports_overflow_where_the_gap_is(
        astore: AsyncStore) -> None:
    """A slow async consumer gets what was queued, then one OverflowEvent, then the rest,
    as the iterator form does; a close from another thread ends the waiting iteration."""
    from walsync.engine.events import OverflowEvent

    async def main() -> list[Any]:
        sub = astore.events(kinds=("commit",), max_queued=5)
        for i in range(20):
            await astore.put(f"k{i}", i)
        deadline = time.monotonic() + 10
        while sub.dropped < 15 and time.monotonic() < deadline:  # the dispatcher's thread
            await asyncio.sleep(0.001)
        got: list[Any] = []
        async for event in sub:
            got.append(event)
            if len(got) == 6:
                await astore.put("after", 1)
            if len(got) == 7 or time.monotonic() > deadline:
                break
        waiting = asyncio.create_task(_collect(sub))
        await asyncio.sleep(0.01)
        threading.Thread(target=sub.close).start()
        assert await asyncio.wait_for(waiting, 5) == []
        return got

    got = asyncio.run(main())
    assert [e.lsn for e in got[:5]] == [1, 2, 3, 4, 5]
    assert isinstance(got[5], OverflowEvent)
    assert (got[5].dropped, got[5].first_lsn, got[5].last_lsn) == (15, 6, 20)
    assert isinstance(got[6], CommitEvent)
    assert got[6].lsn == 21


def test_aio_commits_during_a_compaction_wait_on_the_loop_not_in_it(
        astore: AsyncStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compaction closes the snapshot for its duration (here held 0.5 s); awaited
    commits made meanwhile wait for it without holding up the loop, then land."""
    from walsync.engine.snapshot import bulk

    inside = threading.Event()
    real = bulk._sync_copied_file

    def slow_sync(path: Path) -> None:
        if astore.store._snapshot.gate.closed:  # the compaction's copy, not a base copy
            inside.set()
            time.sleep(0.5)
        real(path)

    monkeypatch.setattr(bulk, "_sync_copied_file", slow_sync)
    asyncio.run(astore.put("before", 1))

    async def main() -> tuple[float, float]:
        compacting = threading.Thread(target=astore.store.compact)
        compacting.start()
        while not inside.is_set():
            await asyncio.sleep(0.001)
        started = time.monotonic()
        worst = 0.0

        async def tick() -> None:
            nonlocal worst
            while True:
                t = time.monotonic()
                await asyncio.sleep(0.001)
                worst = max(worst, time.monotonic() - t)

        ticker = asyncio.create_task(tick())
        await asyncio.gather(*(astore.put(f"k{i}", i) for i in range(20)))
        took = time.monotonic() - started
        ticker.cancel()
        while compacting.is_alive():
            await asyncio.sleep(0.005)
        return took, worst

    took, worst = asyncio.run(main())
    assert took >= 0.3, f"the commits did not wait for the compaction ({took:.3f} s)"
    assert worst < 0.25, f"the loop was held {worst:.3f} s by a compaction"
    assert [astore.get(f"k{i}") for i in range(20)] == list(range(20))
