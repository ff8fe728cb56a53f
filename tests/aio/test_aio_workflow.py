"""The async workflow layer beyond the shared resume rules: concurrent steps of one run,
``@step`` on ``async def``, cancellation, and the sync API's refusal of a coroutine."""

from __future__ import annotations

import asyncio
import random
import warnings
from pathlib import Path
from typing import Any

import pytest

from walsync.engine import Store, verify
from walsync.engine.errors import WorkflowError
from walsync.engine.workflow import (
    RunStatus,
    StepStatus,
    Workflows,
    current_async_step,
    keys,
    step,
)


def test_aio_gathered_steps_of_one_run_record_distinct_ids_and_resume_without_running(
        store_path: Path) -> None:
    calls: list[int] = []

    @step
    async def fetch(page: int) -> dict[str, int]:
        calls.append(page)
        await asyncio.sleep(random.random() / 1000)
        return {"page": page}

    def plain(n: int) -> int:
        return -n

    async def drive(store: Store) -> list[Any]:
        async with Workflows(store).arun("w", "r") as run:
            got = await asyncio.gather(*(fetch(i) for i in range(300)))
            sync_outputs = await asyncio.gather(*(run.step(f"sync{i}", plain, i)
                                                  for i in range(5)))
            return [got, sync_outputs]

    with Store.open(store_path) as s1:
        first = asyncio.run(drive(s1))
        run = Workflows(s1).get_run("r")
        base = fetch.__qualname__
        ids = [s.step_id for s in run.ordered_steps()]
        assert ids[:300] == [base] + [f"{base}#{i}" for i in range(2, 301)]
        assert len(set(ids)) == len(ids) == 305
        assert run.record.steps_done == 305
        assert run.status == RunStatus.COMPLETED
        assert all(s.status == StepStatus.SUCCESS for s in run.steps.values())
    assert first[0] == [{"page": i} for i in range(300)]
    assert first[1] == [-i for i in range(5)]
    assert sorted(calls) == list(range(300))
    with Store.open(store_path) as s2:
        again = asyncio.run(drive(s2))
        # the outputs recorded per id: the n-th call gets the n-th call's output
        assert again == first
        assert Workflows(s2).get_run("r").record.steps_done == 305
    assert len(calls) == 300
    assert verify(store_path).ok


def test_aio_begin_reports_progress_cost_and_cursor(store_path: Path) -> None:
    attempts: list[Any] = []

    async def scan(stop_at: int | None) -> None:
        with Store.open(store_path) as store:
            async with Workflows(store).arun("w", "r") as run, \
                    run.begin("scan", inputs={"rows": 10}) as s:
                if not s.done:
                    attempts.append((s.attempt, s.cursor))
                    start = s.cursor or 0
                    for row in range(start, 10):
                        await s.add_cost(tokens_in=10, usd=0.01, rows=1)
                        await s.progress((row + 1) / 10, cursor=row + 1)
                        if row + 1 == stop_at:
                            raise asyncio.CancelledError
                    await s.complete({"rows": 10})

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(scan(4))
    with Store.open(store_path) as s:
        rec = Workflows(s).get_run("r").steps["scan"]
        assert rec.status == StepStatus.CANCELLED
        assert (rec.fraction, rec.cursor) == (0.4, 4)
        assert rec.cost["tokens_in"] == 40
    asyncio.run(scan(None))
    assert attempts == [(1, None), (2, 4)]
    with Store.open(store_path) as s:
        run = Workflows(s).get_run("r")
        assert run.status == RunStatus.COMPLETED
        assert run.output("scan") == {"rows": 10}
        assert run.cost.tokens_in == 100
        assert run.cost.counters["rows"] == 10
        assert run.steps["scan"].inputs == {"rows": 10}


def _cancel_after(task: asyncio.Task[Any], turns: int) -> None:
    """Cancel ``task`` after ``turns`` more turns of the loop: lands at any await."""
    if turns <= 0:
        task.cancel()
    else:
        asyncio.get_running_loop().call_soon(_cancel_after, task, turns - 1)


@pytest.mark.parametrize("seed", range(4))
def test_aio_cancelled_step_tasks_leave_the_run_consistent(store_path: Path, seed: int) -> None:
    """Tasks driving steps of one run are cancelled at random points (while starting,
    in the body, reporting progress or completing); the run in memory and on disk
    agree step by step, the summary counts the successes, and a second drive runs
    exactly the steps that did not succeed."""
    rng = random.Random(seed)
    ran: list[int] = []

    async def body(i: int) -> int:
        ran.append(i)
        await asyncio.sleep(rng.choice([0, 0, 0.0005]))
        await current_async_step().progress(0.5, cursor=i)
        return i * 10

    async def drive(cancel: bool) -> dict[str, str]:
        async with Workflows(store).arun("w", "r") as run:
            tasks = [asyncio.create_task(run.step(f"s{i}", body, i)) for i in range(120)]
            if cancel:
                for task in tasks:
                    if rng.random() < 0.6:
                        _cancel_after(task, rng.randint(0, 40))
            results = await asyncio.gather(*tasks, return_exceptions=True)
            if not cancel:
                assert results == [i * 10 for i in range(120)]
            assert run.record.steps_done == sum(
                s.status == StepStatus.SUCCESS for s in run.steps.values())
            return {sid: s.status for sid, s in run.steps.items()}

    with Store.open(store_path) as store:
        in_memory = asyncio.run(drive(cancel=True))
        succeeded = {sid for sid, status in in_memory.items() if status == StepStatus.SUCCESS}
        assert 0 < len(succeeded) < 120
    with Store.open(store_path) as store:
        reread = Workflows(store).get_run("r")
        assert {sid: s.status for sid, s in reread.steps.items()} == in_memory
        for sid in succeeded:
            assert reread.output(sid) == int(sid[1:]) * 10
        assert reread.record.steps_done == len(succeeded)
        first_drive = len(ran)
        asyncio.run(drive(cancel=False))
        rerun = ran[first_drive:]
        assert sorted(f"s{i}" for i in rerun) == sorted({f"s{i}" for i in range(120)} - succeeded)
        assert Workflows(store).get_run("r").status == RunStatus.COMPLETED
    assert verify(store_path).ok


def test_aio_step_callable_may_return_an_awaitable(store_path: Path) -> None:
    async def later(x: int) -> int:
        return x + 1

    async def main() -> list[Any]:
        with Store.open(store_path) as s:
            async with Workflows(s).arun("w", "r") as run:
                return [await run.step("lambda", lambda: later(1)),
                        await run.step("coro", later, 2),
                        await run.step("sync", lambda: 4)]

    assert asyncio.run(main()) == [2, 3, 4]


def test_aio_sync_step_refuses_a_coroutine_clearly(store_path: Path) -> None:
    async def body() -> int:
        return 1

    with Store.open(store_path) as s:
        run = Workflows(s).run("w", "r")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the coroutine is closed, never left unawaited
            with pytest.raises(WorkflowError, match="awaitable"), run:
                run.step("a", body)
        assert run.steps["a"].status == StepStatus.FAILURE
        stored = s.get(keys.step("r", "a"))
        assert stored is not None
        assert "awaitable" in stored["error"]["message"]


def test_aio_awaited_run_opener_creates_without_starting(store_path: Path) -> None:
    async def main() -> str:
        with Store.open(store_path) as s:
            run = await Workflows(s).arun("w", "r", inputs={"x": 1})
            assert run.status == RunStatus.PENDING
            async with run:
                await run.set_metadata(pending_questions=["q"])
                assert run.status == RunStatus.RUNNING
            return run.status

    assert asyncio.run(main()) == RunStatus.COMPLETED


def test_aio_step_cancelled_while_its_completion_is_awaited_stays_a_success(
        store_path: Path) -> None:
    """The completion is queued when the cancellation lands: it commits, and the step
    is (and stays) a success that never runs again, counted once in the summary."""
    ran: list[int] = []

    async def body(task: list[asyncio.Task[Any]]) -> str:
        ran.append(1)
        # lands while the step's completion commit is awaited
        asyncio.get_running_loop().call_soon(task[0].cancel)
        return "charged"

    async def drive() -> None:
        holder: list[asyncio.Task[Any]] = []
        async with Workflows(store).arun("w", "r") as run:
            stepping = asyncio.create_task(run.step("charge", body, holder, idempotent=False))
            holder.append(stepping)
            with pytest.raises(asyncio.CancelledError):
                await stepping
            assert run.steps["charge"].status == StepStatus.SUCCESS
            assert run.record.steps_done == 1
            assert await run.step("charge", body, holder, idempotent=False) == "charged"

    with Store.open(store_path) as store:
        asyncio.run(drive())
    with Store.open(store_path) as store:
        run = Workflows(store).get_run("r")
        assert run.steps["charge"].status == StepStatus.SUCCESS
        assert run.record.steps_done == 1
        assert run.output("charge") == "charged"
    assert ran == [1]


def test_aio_step_that_raises_after_complete_stays_a_success(store_path: Path) -> None:
    """The same rule in the sync form: once ``complete`` returned, the step succeeded;
    an exception later in the block is the caller's, and the summary stays true."""
    with Store.open(store_path) as store:
        run = Workflows(store).run("w", "r")

        def drive() -> None:
            with run, run.begin("pay") as s:
                s.complete("paid")
                raise RuntimeError("after the step")

        with pytest.raises(RuntimeError, match="after"):
            drive()
        assert run.steps["pay"].status == StepStatus.SUCCESS
        assert run.record.steps_done == 1
    with Store.open(store_path) as store:
        again = Workflows(store).get_run("r")
        assert again.steps["pay"].status == StepStatus.SUCCESS
        assert again.record.steps_done == 1
        calls: list[int] = []
        with again:
            assert again.step("pay", lambda: calls.append(1)) == "paid"
        assert calls == []


def test_aio_run_entry_cancelled_leaves_no_run_active(store_path: Path) -> None:
    """A task cancelled while its run's start (or a step's) is awaited, and going on, is
    not left inside that run (or step)."""
    from walsync.engine.workflow import current_run

    async def enter_run(opened: Any) -> str:
        asyncio.get_running_loop().call_soon(asyncio.current_task().cancel)  # type: ignore[union-attr]
        try:
            await opened.__aenter__()
        except asyncio.CancelledError:
            with pytest.raises(WorkflowError, match="no run is active"):
                current_run()
            return "left"
        return "entered"

    async def enter_step(run: Any) -> str:
        asyncio.get_running_loop().call_soon(asyncio.current_task().cancel)  # type: ignore[union-attr]
        try:
            await run.begin("s").__aenter__()
        except asyncio.CancelledError:
            with pytest.raises(WorkflowError, match="no step is active"):
                current_async_step()
            return "left"
        return "entered"

    async def main() -> None:
        with Store.open(store_path) as store:
            opened = await Workflows(store).arun("w", "r")
            assert await asyncio.create_task(enter_run(opened)) == "left"
            async with opened as run:
                assert await asyncio.create_task(enter_step(run)) == "left"
                assert await run.step("s", lambda: 5) == 5

    asyncio.run(main())


def test_aio_checkpoint_and_rollback_are_awaited(store_path: Path) -> None:
    async def main() -> None:
        with Store.open(store_path) as store:
            async with Workflows(store).arun("w", "r") as run:
                await run.step("a", lambda: 1)
                await run.checkpoint("after-a", "a done", tags=["t"])
                await run.step("b", lambda: 2)
                report = await run.rollback("after-a")
                assert report.checkpoint == "after-a"
                assert report.discarded_steps == ["b"]
                assert "b" not in run.snapshot()
                assert await run.step("b", lambda: 3) == 3
            assert [c.name for c in run.run.checkpoints()] == ["after-a"]
            assert Workflows(store).get_run("r").snapshot() == {"a": 1, "b": 3}

    asyncio.run(main())
