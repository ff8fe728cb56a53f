"""The workflow layer's resume rules and records (README's resume table)."""

from __future__ import annotations

import math
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.workflow._async_drive import drive_async
from tests.workflow._internal import put_internal
from walsync.engine import Store
from walsync.engine.errors import (
    InvalidValueError,
    RunNotFoundError,
    StepNeedsAttentionError,
    WorkflowError,
)
from walsync.engine.workflow import (
    Run,
    RunStatus,
    StepRecord,
    StepStatus,
    Workflows,
    current_run,
    current_step,
    keys,
    step,
)

CHILD = Path(__file__).resolve().parent / "_child.py"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, params=["sync", "async"])
def api(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every rule holds for the sync API and for the async one (tests/workflow/_async_drive.py:
    the same statements, each the awaited form, with ``async def`` step bodies)."""
    if request.param == "async":
        for _drive in drive_async(monkeypatch, sys.modules[__name__]):
            yield request.param
    else:
        yield request.param


class Counter:
    """A step body that counts its calls and returns ``value``."""

    def __init__(self, value: Any = None) -> None:
        self.calls = 0
        self.value = value
        self.cursors: list[Any] = []

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        self.cursors.append(current_step().cursor)
        return self.value if self.value is not None else list(args)


class Abort(BaseException):
    """Leaves a step body without being an Exception (the step becomes 'cancelled')."""


def write_step(store: Store, run_id: str, rec: StepRecord) -> None:
    """Write a step record directly, as a crashed process could have left it."""
    put_internal(store, keys.step(run_id, rec.step_id), rec.to_dict())


def stored_step(store: Store, run_id: str, step_id: str) -> StepRecord:
    raw = store.get(keys.step(run_id, step_id))
    assert raw is not None, f"no stored record for step {step_id!r}"
    return StepRecord.from_dict(raw)


def stored_run_status(store: Store, run_id: str) -> str:
    raw = store.get(keys.run(run_id))
    assert raw is not None
    return str(raw["status"])


# ---------------------------------------------------------------- success never reruns


def test_step_success_never_runs_again_and_returns_recorded_output(store_path: Path) -> None:
    body = Counter({"rows": [1, 2, 3]})
    with Store.open(store_path) as s1:
        run = Workflows(s1).run("etl", "r1")
        with run:
            assert run.step("fetch", body) == {"rows": [1, 2, 3]}
        assert run.status == RunStatus.COMPLETED
    assert body.calls == 1

    body.value = {"rows": ["different"]}
    with Store.open(store_path) as s2:
        run2 = Workflows(s2).get_run("r1")
        with run2:
            assert run2.step("fetch", body) == {"rows": [1, 2, 3]}
        # A second run object of the same process resumes the same way.
        run3 = Workflows(s2).run("etl", "r1")
        with run3:
            assert run3.step("fetch", body) == {"rows": [1, 2, 3]}
        assert run3.steps["fetch"].attempts == 1
    assert body.calls == 1


def test_step_success_satisfies_dependants_across_paused_run(store: Store) -> None:
    """A run paused after a success resumes with the success counted, not re-run."""
    wf = Workflows(store)
    first, second = Counter(10), Counter(20)
    run = wf.run("w", "r")
    with run:
        a = run.step("a", first)
        run.pause("operator")
    assert run.status == RunStatus.PAUSED
    again = wf.get_run("r")
    with again:
        assert again.step("a", first) == a
        assert again.step("b", second, a) == 20
    assert (first.calls, second.calls) == (1, 1)
    assert again.status == RunStatus.COMPLETED
    assert again.record.steps_done == 2


# ---------------------------------------------------------------- statuses that run again


def _make_failure(wf: Workflows, run_id: str, sid: str) -> None:
    def boom() -> None:
        raise ValueError("boom")

    run = wf.run("w", run_id)
    with pytest.raises(ValueError, match="boom"), run:
        run.step(sid, boom)
    assert run.status == RunStatus.FAILED


def _make_cancelled(wf: Workflows, run_id: str, sid: str) -> None:
    def interrupted() -> None:
        raise Abort()

    run = wf.run("w", run_id)
    with pytest.raises(Abort), run:
        run.step(sid, interrupted)


def _make_skipped(wf: Workflows, run_id: str, sid: str) -> None:
    run = wf.run("w", run_id)
    write_step(wf.store, run_id, StepRecord(sid, StepStatus.RUNNING.value, idempotent=False,
                                            attempts=1))
    run = wf.get_run(run_id)
    with pytest.raises(StepNeedsAttentionError), run:
        run.step(sid, Counter())
    run.resolve(sid, "skip")


def _make_pending(wf: Workflows, run_id: str, sid: str) -> None:
    wf.run("w", run_id)
    write_step(wf.store, run_id, StepRecord(sid, StepStatus.PENDING.value))


@pytest.mark.parametrize(
    ("status", "make"),
    [
        ("failure", _make_failure),
        ("cancelled", _make_cancelled),
        ("skipped", _make_skipped),
        ("pending", _make_pending),
    ],
)
def test_step_rerun_statuses_run_body_again(
    store_path: Path, status: str, make: Callable[[Workflows, str, str], None]
) -> None:
    with Store.open(store_path) as s1:
        make(Workflows(s1), "r", "work")
        assert stored_step(s1, "r", "work").status == status
    body = Counter("second time")
    with Store.open(store_path) as s2:
        run = Workflows(s2).get_run("r")
        assert run.steps["work"].status == status
        with run:
            assert run.step("work", body) == "second time"
        assert body.calls == 1
        assert run.status == RunStatus.COMPLETED
        rec = stored_step(s2, "r", "work")
        assert rec.status == StepStatus.SUCCESS
        assert rec.output == "second time"
        assert rec.error is None


@pytest.mark.parametrize("status", ["failure", "cancelled", "skipped", "pending"])
def test_step_rerun_statuses_written_directly_run_again(wf: Workflows, status: str) -> None:
    wf.run("w", "r")
    write_step(wf.store, "r", StepRecord("s", status, attempts=1, output="stale"))
    body = Counter("fresh")
    run = wf.get_run("r")
    with run:
        assert run.step("s", body) == "fresh"
    assert body.calls == 1
    assert run.steps["s"].attempts == 2


# ---------------------------------------------------------------- interrupted ('running') steps


def test_step_running_idempotent_resumes_from_cursor(wf: Workflows) -> None:
    run = wf.run("w", "r")
    write_step(wf.store, "r", StepRecord("copy", StepStatus.RUNNING.value, attempts=1,
                                         fraction=0.3, cursor={"rows_done": 300}))
    seen: list[Any] = []

    def copy() -> int:
        ctx = current_step()
        seen.append((ctx.cursor, ctx.attempt))
        start = ctx.cursor["rows_done"] if ctx.cursor else 0
        return 1000 - start

    run = wf.get_run("r")
    with run:
        assert run.step("copy", copy) == 700
    assert seen == [({"rows_done": 300}, 2)]
    assert run.interrupted == [("copy", "resumes from its cursor")]
    rec = stored_step(wf.store, "r", "copy")
    assert rec.status == StepStatus.SUCCESS
    assert rec.interrupted_at is not None
    assert rec.fraction == 1.0


def test_step_running_non_idempotent_needs_attention_and_pauses_run(store_path: Path) -> None:
    body = Counter("charged")
    with Store.open(store_path) as s1:
        wf = Workflows(s1)
        run = wf.run("w", "r")
        with run:
            run.step("before", Counter("ok"))
            run.pause()
        write_step(s1, "r", StepRecord("charge", StepStatus.RUNNING.value, idempotent=False,
                                       seq=1, attempts=1))
        run = wf.get_run("r")

        def drive() -> None:
            with run:
                run.step("before", Counter("never"))
                run.step("charge", body, idempotent=False)

        with pytest.raises(StepNeedsAttentionError) as info:
            drive()
        assert info.value.step_id == "charge"
        assert info.value.run_id == "r"
        assert body.calls == 0
        assert run.status == RunStatus.PAUSED
        assert run.interrupted == [("charge", "needs attention")]
    with Store.open(store_path) as s2:
        assert stored_run_status(s2, "r") == RunStatus.PAUSED
        rec = stored_step(s2, "r", "charge")
        assert rec.status == StepStatus.NEEDS_ATTENTION
        assert rec.interrupted_at is not None
        # Driving again without a decision does not run it either.
        run = Workflows(s2).get_run("r")
        with pytest.raises(StepNeedsAttentionError), run:
            run.step("charge", body, idempotent=False)
        assert body.calls == 0
        assert run.status == RunStatus.PAUSED


def _kill_child_mid_step(store_path: Path, idempotent: bool) -> None:
    """A child process starts step 'work', saves progress, and is SIGKILLed in its body."""
    with subprocess.Popen(
        [sys.executable, str(CHILD), "midstep", str(store_path), "1" if idempotent else "0"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stderr is not None
            line = proc.stdout.readline()
            if line.strip() != "MID":
                proc.kill()
                pytest.fail(f"child said {line!r}; stderr: {proc.stderr.read()}")
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_step_killed_mid_step_idempotent_resumes_from_cursor(store_path: Path) -> None:
    _kill_child_mid_step(store_path, idempotent=True)
    seen: list[Any] = []

    def work() -> str:
        seen.append(current_step().cursor)
        return "finished"

    with Store.open(store_path) as store:
        run = Workflows(store).get_run("r")
        assert run.steps["work"].status == StepStatus.RUNNING
        assert run.steps["work"].fraction == 0.5
        prep = Counter("again")
        with run:
            assert run.step("prep", prep) == "prepared"
            assert run.step("work", work) == "finished"
        assert prep.calls == 0
        assert seen == [{"rows": 5}]
        assert run.steps["work"].attempts == 2
        assert run.status == RunStatus.COMPLETED


def test_step_killed_mid_step_non_idempotent_needs_attention(store_path: Path) -> None:
    _kill_child_mid_step(store_path, idempotent=False)
    body = Counter("done")
    with Store.open(store_path) as store:
        run = Workflows(store).get_run("r")

        def drive() -> None:
            with run:
                run.step("prep", Counter())
                run.step("work", body, idempotent=False)

        with pytest.raises(StepNeedsAttentionError):
            drive()
        assert body.calls == 0
        assert run.status == RunStatus.PAUSED
        assert run.steps["work"].status == StepStatus.NEEDS_ATTENTION
        # The decision: retry; the body sees the cursor it saved before the kill.
        run.resolve("work", "retry")
        with run:
            run.step("prep", Counter())
            assert run.step("work", body, idempotent=False) == "done"
        assert body.calls == 1
        assert body.cursors == [{"rows": 5}]
        assert run.status == RunStatus.COMPLETED


# ---------------------------------------------------------------- resolve


def _attention_run(wf: Workflows, cursor: Any = None) -> Run:
    run = wf.run("w", "r", total_steps=2)
    write_step(wf.store, "r", StepRecord("pay", StepStatus.RUNNING.value, idempotent=False,
                                         attempts=1, cursor=cursor))
    run = wf.get_run("r")
    with pytest.raises(StepNeedsAttentionError), run:
        run.step("pay", Counter())
    assert run.steps["pay"].status == StepStatus.NEEDS_ATTENTION
    return run


def test_run_resolve_retry_runs_the_step_again(wf: Workflows) -> None:
    run = _attention_run(wf, cursor={"paid": 2})
    run.resolve("pay", "retry")
    assert stored_step(wf.store, "r", "pay").status == StepStatus.PENDING
    body = Counter("paid")
    fresh = wf.get_run("r")
    with fresh:
        assert fresh.step("pay", body, idempotent=False) == "paid"
    assert body.calls == 1
    assert body.cursors == [{"paid": 2}]
    assert fresh.steps["pay"].attempts == 2
    assert fresh.status == RunStatus.COMPLETED


def test_run_resolve_skip_marks_skipped_without_running(wf: Workflows) -> None:
    run = _attention_run(wf)
    run.resolve("pay", "skip")
    rec = stored_step(wf.store, "r", "pay")
    assert rec.status == StepStatus.SKIPPED
    assert rec.output is None
    assert run.record.steps_done == 0
    # The run is no longer blocked: the orchestrator re-evaluates the step.
    fresh = wf.get_run("r")
    with fresh:
        if fresh.steps["pay"].status != StepStatus.SKIPPED:
            fresh.step("pay", Counter())
        fresh.step("next", Counter("n"))
    assert fresh.status == RunStatus.COMPLETED
    assert fresh.steps["pay"].status == StepStatus.SKIPPED
    assert fresh.steps["next"].status == StepStatus.SUCCESS


def test_run_resolve_succeed_records_output_without_running(wf: Workflows) -> None:
    run = _attention_run(wf)
    run.resolve("pay", "succeed", {"receipt": "r-1"})
    rec = stored_step(wf.store, "r", "pay")
    assert rec.status == StepStatus.SUCCESS
    assert rec.output == {"receipt": "r-1"}
    assert run.record.steps_done == 1
    assert run.record.progress == 50.0
    body = Counter("never")
    fresh = wf.get_run("r")
    with fresh:
        assert fresh.step("pay", body, idempotent=False) == {"receipt": "r-1"}
    assert body.calls == 0


def test_run_resolve_on_success_step_keeps_summary_consistent(wf: Workflows) -> None:
    run = wf.run("w", "r", total_steps=2)
    with run:
        run.step("a", lambda: "A")
        run.step("b", lambda: "B")
    run.resolve("a", "retry")
    run.resolve("b", "skip")
    assert run.record.steps_done == 0
    assert run.record.progress == 0.0
    stored = wf.get_run("r")
    assert stored.record.steps_done == 0
    assert wf.validate(stored.state()) == []
    assert wf.recover("r", "w").outcome == "recovered"


def test_run_resolve_rejects_unknown_action_and_step(wf: Workflows) -> None:
    run = _attention_run(wf)
    with pytest.raises(ValueError, match="retry"):
        run.resolve("pay", "ignore")
    with pytest.raises(WorkflowError, match="no step"):
        run.resolve("nope", "retry")
    assert stored_step(wf.store, "r", "pay").status == StepStatus.NEEDS_ATTENTION


# ---------------------------------------------------------------- every status reachable


def test_run_statuses_all_reachable_and_indexed(wf: Workflows) -> None:
    pending = wf.run("w", "pending")
    running = wf.run("w", "running")
    running.start()
    paused = wf.run("w", "paused")
    with paused:
        paused.pause("waiting for a human")
    completed = wf.run("w", "completed")
    with completed:
        completed.step("a", Counter(1))
    failed = wf.run("w", "failed")
    with pytest.raises(RuntimeError), failed:
        raise RuntimeError("broken")
    cancelled = wf.run("w", "cancelled")
    with cancelled:
        cancelled.cancel()
    runs = {"pending": pending, "running": running, "paused": paused, "completed": completed,
            "failed": failed, "cancelled": cancelled}
    for status, run in runs.items():
        assert run.status == status
        assert stored_run_status(wf.store, run.run_id) == status
        assert [r.run_id for r in wf.list_runs(status=status)] == [status]
    assert {s.value for s in RunStatus} == set(runs)
    assert failed.record.error is not None
    assert failed.record.error["type"] == "RuntimeError"
    assert paused.record.metadata["paused_reason"] == "waiting for a human"
    assert completed.record.completed_at is not None


def test_step_statuses_all_reachable(wf: Workflows) -> None:
    seen_running: list[str] = []
    run = wf.run("w", "r")

    def observe() -> str:
        # Another reader of the store sees the step 'running' while its body runs.
        seen_running.append(stored_step(wf.store, "r", "running").status)
        return "ok"

    def fail() -> None:
        raise KeyError("x")

    def cancel() -> None:
        raise Abort()

    with run:
        run.step("running", observe)
        with pytest.raises(KeyError):
            run.step("failure", fail)
        with pytest.raises(Abort):
            run.step("cancelled", cancel)
        run.pause()
    write_step(wf.store, "r", StepRecord("pending", StepStatus.RUNNING.value, idempotent=False,
                                         seq=10))
    write_step(wf.store, "r", StepRecord("skipped", StepStatus.RUNNING.value, idempotent=False,
                                         seq=11))
    write_step(wf.store, "r", StepRecord("needs_attention", StepStatus.RUNNING.value,
                                         idempotent=False, seq=12))
    run = wf.get_run("r")
    run.start()
    run.resolve("pending", "retry")
    run.resolve("skipped", "skip")
    final = {sid: stored_step(wf.store, "r", sid).status for sid in run.steps}
    assert seen_running == ["running"]
    assert final == {
        "running": "success", "failure": "failure", "cancelled": "cancelled",
        "pending": "pending", "skipped": "skipped", "needs_attention": "needs_attention",
    }
    assert {s.value for s in StepStatus} == set(final.values()) | {"running"}
    failure = stored_step(wf.store, "r", "failure")
    assert failure.error is not None
    assert failure.error["type"] == "KeyError"


# ---------------------------------------------------------------- decorator and context manager


def test_step_decorator_auto_ids_and_numbers_repeated_calls(store_path: Path) -> None:
    calls: list[int] = []

    @step
    def fetch(page: int) -> list[int]:
        calls.append(page)
        return [page * 10, page * 10 + 1]

    @step(name="charge", idempotent=False)
    def charge(amount: int) -> str:
        calls.append(-amount)
        return f"charged {amount}"

    def drive(run: Run) -> list[Any]:
        with run:
            return [fetch(1), fetch(2), fetch(3), charge(5), charge(7)]

    with Store.open(store_path) as s1:
        run = Workflows(s1).run("w", "r")
        first = drive(run)
        base = fetch.__qualname__
        assert [s.step_id for s in run.ordered_steps()] == [
            base, f"{base}#2", f"{base}#3", "charge", "charge#2",
        ]
        assert run.steps["charge#2"].idempotent is False
        assert run.steps[base].idempotent is True
        assert fetch.__name__ == "fetch"
    assert calls == [1, 2, 3, -5, -7]
    with Store.open(store_path) as s2:
        again = drive(Workflows(s2).get_run("r"))
    assert again == first
    assert calls == [1, 2, 3, -5, -7]


def test_step_decorator_same_run_object_driven_twice_does_not_rerun(wf: Workflows) -> None:
    """A run paused and resumed in the same process: the decorator's ids restart."""
    calls: list[str] = []

    @step(name="load")
    def load(part: str) -> str:
        calls.append(part)
        return part.upper()

    run = wf.run("w", "r")
    with run:
        assert [load("a"), load("b")] == ["A", "B"]
        run.pause("approval")
    with run:
        assert [load("a"), load("b")] == ["A", "B"]
    assert calls == ["a", "b"]
    assert sorted(run.steps) == ["load", "load#2"]


def test_step_decorator_outside_run_raises(wf: Workflows) -> None:
    @step
    def lonely() -> int:
        return 1

    with pytest.raises(WorkflowError, match="no run is active"):
        lonely()
    with pytest.raises(WorkflowError, match="no run is active"):
        current_run()
    with pytest.raises(WorkflowError, match="no step is active"):
        current_step()


def test_run_begin_context_manager_records_once(wf: Workflows) -> None:
    run = wf.run("w", "r")
    bodies = 0
    with run:
        with run.begin("transform", inputs={"n": 3}) as ctx:
            assert not ctx.done
            assert ctx.attempt == 1
            bodies += 1
            ctx.complete([1, 2, 3])
        assert ctx.output == [1, 2, 3]
        with run.begin("implicit") as ctx2:
            bodies += 1  # leaving without complete() records None
        assert ctx2.output is None
        with pytest.raises(WorkflowError, match="already succeeded"):
            ctx.complete([4])
    assert run.steps["transform"].inputs == {"n": 3}
    again = wf.get_run("r")
    with again:
        with again.begin("transform") as c:
            if not c.done:
                bodies += 1
        assert c.done
        assert c.output == [1, 2, 3]
        with again.begin("implicit") as c2:
            assert c2.done
    assert bodies == 2
    assert stored_step(wf.store, "r", "implicit").status == StepStatus.SUCCESS


def test_run_begin_rejects_bad_ids(wf: Workflows) -> None:
    run = wf.run("w", "r")
    with pytest.raises(ValueError, match="step id"):
        run.begin("a/b")
    with pytest.raises(ValueError, match="step id"):
        run.begin("")
    with pytest.raises(ValueError, match="run id"):
        wf.run("w", "x/y")


# ---------------------------------------------------------------- progress and cost


def test_step_progress_is_durable_after_reopen(store_path: Path) -> None:
    with Store.open(store_path) as s1:
        run = Workflows(s1).run("w", "r")

        def partial() -> None:
            ctx = current_step()
            ctx.progress(0.25, cursor={"row": 25})
            ctx.progress(0.4, cursor={"row": 40})
            raise Abort()

        with pytest.raises(Abort), run:
            run.step("scan", partial)
    with Store.open(store_path) as s2:
        rec = stored_step(s2, "r", "scan")
        assert rec.fraction == pytest.approx(0.4)
        assert rec.cursor == {"row": 40}
        run = Workflows(s2).get_run("r")
        body = Counter("done")
        with run:
            assert run.step("scan", body) == "done"
        assert body.cursors == [{"row": 40}]


@pytest.mark.parametrize("fraction", [-0.01, 1.0001, math.nan, math.inf, -math.inf])
def test_step_progress_rejects_fraction_out_of_range(wf: Workflows, fraction: float) -> None:
    run = wf.run("w", "r")
    with run, run.begin("s") as ctx:
        with pytest.raises(ValueError, match="fraction"):
            ctx.progress(fraction, cursor="bad")
        ctx.progress(0.0, cursor="start")
        ctx.progress(1.0, cursor="end")
        ctx.complete(None)
    rec = stored_step(wf.store, "r", "s")
    assert rec.cursor == "end"


def test_run_cost_sums_steps_including_failed_attempts(store_path: Path) -> None:
    attempts = 0

    def cheap() -> str:
        current_step().add_cost(tokens_in=100, tokens_out=10, usd=0.5, calls=1)
        return "a"

    def flaky() -> str:
        nonlocal attempts
        attempts += 1
        ctx = current_step()
        ctx.add_cost(tokens_in=50, usd=0.25, calls=1, retries=attempts - 1)
        if attempts == 1:
            raise TimeoutError("model API timed out")
        return "b"

    with Store.open(store_path) as s1:
        wf = Workflows(s1)
        first = wf.run("w", "r")

        def drive() -> None:
            with first:
                first.step("cheap", cheap)
                first.step("flaky", flaky)

        with pytest.raises(TimeoutError):
            drive()
        run = first
        assert run.cost.usd == pytest.approx(0.75)
        run = wf.get_run("r")
        with run:
            run.step("cheap", cheap)
            run.step("flaky", flaky)
    with Store.open(store_path) as s2:
        run = Workflows(s2).get_run("r")
        cost = run.cost
        assert cost.tokens_in == 200
        assert cost.tokens_out == 10
        assert cost.usd == pytest.approx(1.0)
        assert cost.counters == {"calls": 3, "retries": 1}
        flaky_cost = run.steps["flaky"].cost
        assert flaky_cost["tokens_in"] == 100
        assert flaky_cost["usd"] == pytest.approx(0.5)
        assert run.steps["cheap"].cost["tokens_in"] == 100


def test_step_cost_flushed_by_progress_survives_interruption(wf: Workflows) -> None:
    run = wf.run("w", "r")

    def spend() -> None:
        ctx = current_step()
        ctx.add_cost(tokens_out=7, usd=0.01)
        ctx.progress(0.5, cursor=1)
        # Pretend the process dies here: later reads see the cost already.
        raw = wf.store.get(keys.run("r"))
        assert raw["cost"]["tokens_out"] == 7
        raise Abort()

    with pytest.raises(Abort), run:
        run.step("s", spend)
    assert run.cost.tokens_out == 7
    assert wf.get_run("r").cost.usd == pytest.approx(0.01)


def test_run_progress_follows_total_steps(wf: Workflows) -> None:
    run = wf.run("w", "r", total_steps=4)
    seen: list[float] = []

    def look() -> None:
        seen.append(wf.store.get(keys.run("r"))["progress"])

    with run:
        run.step("a", look)
        run.step("b", look)
        assert run.record.progress == 50.0
        assert wf.store.get(keys.index("r"))["status"] == "running"
        run.step("c", look)
    assert seen == [0.0, 25.0, 50.0]
    assert run.record.steps_done == 3
    assert run.record.progress == 100.0  # completing the run
    assert wf.get_run("r").record.progress == 100.0


# ---------------------------------------------------------------- failed commits


def test_step_unstorable_output_fails_step_and_keeps_summary_consistent(wf: Workflows) -> None:
    run = wf.run("w", "r", total_steps=2)

    def unstorable() -> object:
        current_step().add_cost(usd=0.5)
        return object()

    def drive() -> None:
        with run:
            run.step("a", lambda: "A")
            run.step("bad", unstorable)

    with pytest.raises(InvalidValueError, match="bad"):
        drive()
    assert run.status == RunStatus.FAILED
    assert run.record.steps_done == 1
    bad = stored_step(wf.store, "r", "bad")
    assert bad.status == StepStatus.FAILURE
    assert bad.error is not None
    assert bad.error["type"] == "InvalidValueError"
    assert bad.cost["usd"] == pytest.approx(0.5)
    stored = wf.get_run("r")
    assert stored.record.steps_done == 1
    assert stored.record.progress == 50.0
    assert stored.cost.usd == pytest.approx(0.5)
    assert wf.validate(stored.state()) == []
    with stored:
        stored.step("a", Counter())
        assert stored.step("bad", lambda: "fine now") == "fine now"
    assert stored.record.steps_done == 2


def test_step_progress_with_unstorable_cursor_keeps_previous_cursor(wf: Workflows) -> None:
    run = wf.run("w", "r")

    def body() -> str:
        ctx = current_step()
        ctx.progress(0.2, cursor="page-2")
        with pytest.raises(InvalidValueError):
            ctx.progress(0.4, cursor=object())
        assert ctx.cursor == "page-2"
        assert ctx.record.fraction == pytest.approx(0.2)
        return "ok"

    with run:
        assert run.step("s", body) == "ok"
    assert stored_step(wf.store, "r", "s").status == StepStatus.SUCCESS


def test_run_resolve_succeed_with_unstorable_output_changes_nothing(wf: Workflows) -> None:
    run = _attention_run(wf)
    with pytest.raises(InvalidValueError):
        run.resolve("pay", "succeed", object())
    assert run.steps["pay"].status == StepStatus.NEEDS_ATTENTION
    assert run.record.steps_done == 0
    run.pause()
    assert wf.validate(wf.get_run("r").state()) == []
    assert stored_step(wf.store, "r", "pay").status == StepStatus.NEEDS_ATTENTION


# ---------------------------------------------------------------- commits and large outputs


def test_step_completion_and_run_summary_share_one_commit(wf: Workflows) -> None:
    wf.inline_output_bytes = 256
    run = wf.run("w", "r", total_steps=3)
    with run:
        run.step("small", lambda: "x")
        sv = wf.store.get_version(keys.step("r", "small"))
        rv = wf.store.get_version(keys.run("r"))
        iv = wf.store.get_version(keys.index("r"))
        assert sv is not None
        assert rv is not None
        assert iv is not None
        assert sv.lsn == rv.lsn == iv.lsn
        run.step("big", lambda: b"\x01" * 4096)
        rec = run.steps["big"]
        assert rec.output_key is not None
        lsns = {wf.store.get_version(k).lsn  # type: ignore[union-attr]
                for k in (keys.step("r", "big"), keys.run("r"), keys.index("r"), rec.output_key)}
        assert len(lsns) == 1
        summary = wf.store.get(keys.run("r"))
        assert summary["steps_done"] == 2
        assert summary["current_step"] == "big"
        assert summary["progress"] == pytest.approx(200 / 3)


def test_step_large_output_in_own_key_not_rewritten_later(wf: Workflows) -> None:
    wf.inline_output_bytes = 1024
    rng = random.Random(7)
    big = rng.randbytes(64 * 1024)
    run = wf.run("w", "r")
    with run:
        run.step("big", lambda: big)
        rec = run.steps["big"]
        assert rec.output is None
        assert rec.output_key == keys.output("r", "big", 1)
        v1 = wf.store.get_version(rec.output_key)
        assert v1 is not None
        for i in range(5):
            run.step(f"later{i}", lambda i=i: {"i": i})
            assert run.steps[f"later{i}"].output_key is None
        run.step("big2", lambda: rng.randbytes(4096))
    v2 = wf.store.get_version(rec.output_key)
    assert v2 is not None
    assert v2.lsn == v1.lsn
    stored = stored_step(wf.store, "r", "big")
    assert stored.output is None
    assert wf.store.get(rec.output_key) == big
    assert wf.get_run("r").output("big") == big
    # The step record stays small: the output is not inlined.
    assert len(repr(wf.store.get(keys.step("r", "big")))) < 2048


def test_run_state_of_10_mib_saves_and_resumes(store_path: Path) -> None:
    rng = random.Random(10)
    outputs = {f"chunk{i}": rng.randbytes(2 * 1024 * 1024 + i) for i in range(5)}
    with Store.open(store_path) as s1:
        run = Workflows(s1).run("w", "big")
        with run:
            for sid, value in outputs.items():
                run.step(sid, lambda v=value: v)
        assert sum(len(v) for v in outputs.values()) > 10 * 1024 * 1024
    body = Counter(b"never")
    with Store.open(store_path) as s2:
        run = Workflows(s2).get_run("big")
        assert run.status == RunStatus.COMPLETED
        with run:
            got = {sid: run.step(sid, body) for sid in outputs}
        assert got == outputs
        assert run.snapshot() == outputs
    assert body.calls == 0


# ---------------------------------------------------------------- snapshot and hydration


def test_run_snapshot_hydrates_fresh_run_whose_steps_are_skipped(tmp_path: Path) -> None:
    first = Workflows(Store.open(tmp_path / "a"), inline_output_bytes=512)
    try:
        run = first.run("w", "orig")
        with run:
            run.step("a", lambda: 1)
            run.step("b", lambda: {"big": "y" * 2000})
            run.step("c", lambda: [1, 2])
            with pytest.raises(ValueError, match="failed step"), run.begin("d"):
                raise ValueError("failed step is not in the snapshot")
        snap = run.snapshot()
    finally:
        first.store.close()
    assert list(snap) == ["a", "b", "c"]
    assert snap["b"] == {"big": "y" * 2000}

    with Store.open(tmp_path / "b") as store:
        wf = Workflows(store, inline_output_bytes=512)
        hydrated = wf.hydrate(snap, "w", "copy", source="orig@host1")
        assert hydrated.record.restoration_source == "orig@host1"
        assert hydrated.record.steps_done == 3
        assert hydrated.steps["b"].output_key is not None
        body = Counter("new")
        again = wf.get_run("copy")
        with again:
            assert again.step("a", body) == 1
            assert again.step("b", body) == {"big": "y" * 2000}
            assert again.step("c", body) == [1, 2]
            assert again.step("d", body) == "new"
        assert body.calls == 1
        assert [s.step_id for s in again.ordered_steps()] == ["a", "b", "c", "d"]
        assert again.snapshot() == {**snap, "d": "new"}
        with pytest.raises(WorkflowError, match="already has steps"):
            wf.hydrate(snap, "w", "copy")


# ---------------------------------------------------------------- listing and resumable runs


def test_workflows_lists_runs_and_resumable_runs(wf: Workflows) -> None:
    wf.run("w", "pending")
    wf.run("w", "running").start()
    paused = wf.run("w", "paused")
    with paused:
        paused.pause()
    for run_id, retries in (("failed-retry", 1), ("failed-final", 0)):
        run = wf.run("w", run_id, max_retries=retries)
        with pytest.raises(RuntimeError), run:
            raise RuntimeError("x")
    done = wf.run("w", "completed")
    with done:
        done.step("a", lambda: 1)
    wf.run("other", "elsewhere").start()

    assert sorted(r.run_id for r in wf.resumable()) == [
        "elsewhere", "failed-retry", "paused", "running",
    ]
    assert [r.run_id for r in wf.list_runs(workflow="other")] == ["elsewhere"]
    assert sorted(r.run_id for r in wf.list_runs(status=("failed", "completed"))) == [
        "completed", "failed-final", "failed-retry",
    ]
    assert len(wf.list_runs()) == 7

    # The retry is used up by driving it again and failing again.
    again = wf.get_run("failed-retry")
    with pytest.raises(RuntimeError), again:
        raise RuntimeError("still broken")
    assert again.record.retries == 1
    assert "failed-retry" not in {r.run_id for r in wf.resumable()}


def test_workflows_get_run_errors(wf: Workflows) -> None:
    with pytest.raises(RunNotFoundError):
        wf.get_run("missing")
    wf.run("w", "r")
    with pytest.raises(WorkflowError, match="belongs to workflow"):
        wf.run("other", "r")


def test_run_resume_of_1000_completed_steps_runs_no_body(tmp_path: Path) -> None:
    path = tmp_path / "big"
    with Store.open(path, durability="none") as s1:
        run = Workflows(s1).run("w", "thousand", total_steps=1000)
        with run:
            for i in range(1000):
                run.step(f"s{i:04d}", lambda i=i: {"i": i, "pad": "p" * 64})
    body = Counter("never")
    with Store.open(path) as s2:
        t0 = time.perf_counter()
        run = Workflows(s2).run("w", "thousand")
        with run:
            got = [run.step(f"s{i:04d}", body) for i in range(1000)]
        elapsed = time.perf_counter() - t0
        assert len(run.steps) == 1000
    assert body.calls == 0
    assert got[999] == {"i": 999, "pad": "p" * 64}
    assert run.status == RunStatus.COMPLETED
    assert elapsed < 1.0, f"resuming 1,000 completed steps took {elapsed:.3f} s"
