"""Run, step and checkpoint events of the workflow layer (engine/events.py): each
transition arrives once, right after the CommitEvent of the commit that made it,
with that commit's LSN; a change that was not committed announces nothing."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from walsync.engine import (
    CommitEvent,
    Event,
    RunCheckpointEvent,
    RunEvent,
    StepEvent,
    Store,
    Subscription,
)
from walsync.engine.errors import InvalidValueError, StepNeedsAttentionError
from walsync.engine.workflow import Workflows, keys

pytestmark = pytest.mark.timeout(60)


def take_all(sub: Subscription, quiet_seconds: float = 0.1) -> list[Event]:
    """Every event until none came for ``quiet_seconds`` (what was published is
    in the queue well before: the dispatcher never waits)."""
    out = []
    while (event := sub.get(timeout_seconds=quiet_seconds)) is not None:
        out.append(event)
    return out


def check_carried_by_commits(events: list[Event]) -> list[Event]:
    """Assert each transition follows its commit's CommitEvent with its LSN, and commit
    LSNs increase; return the transitions alone."""
    last_commit = 0
    out = []
    for event in events:
        if isinstance(event, CommitEvent):
            assert event.lsn > last_commit
            last_commit = event.lsn
        else:
            assert event.lsn == last_commit, f"{event} does not follow its commit"
            out.append(event)
    return out


def run_ev(run_id: str, old: str | None, new: str) -> tuple[Any, ...]:
    return ("run", run_id, old, new)


def step_ev(run_id: str, step_id: str, old: str | None, new: str, attempts: int
            ) -> tuple[Any, ...]:
    return ("step", run_id, step_id, old, new, attempts)


def brief(event: Event) -> tuple[Any, ...]:
    if isinstance(event, RunEvent):
        return run_ev(event.run_id, event.old_status, event.new_status)
    if isinstance(event, StepEvent):
        return step_ev(event.run_id, event.step_id, event.old_status, event.new_status,
                       event.attempts)
    assert isinstance(event, RunCheckpointEvent)
    return ("checkpoint", event.run_id, event.name, event.action)


def boom() -> None:
    raise RuntimeError("step failed")


@pytest.fixture
def events(store: Store) -> Iterator[Subscription]:
    with store.events.subscribe(kinds=("commit", "run", "step", "run_checkpoint")) as sub:
        yield sub


def test_events_run_and_step_transitions_follow_their_commits(
    wf: Workflows, events: Subscription,
) -> None:
    run = wf.run("w", "r1")

    def first_drive() -> None:
        with run:
            run.step("a", lambda: 1)
            run.step("b", boom)

    with pytest.raises(RuntimeError):
        first_drive()
    with run:  # resume: a is not run again, b is
        run.step("a", lambda: 1)
        run.step("b", lambda: 2)
    got = check_carried_by_commits(take_all(events))
    assert [brief(e) for e in got] == [
        run_ev("r1", None, "pending"),
        run_ev("r1", "pending", "running"),
        step_ev("r1", "a", None, "running", 1),
        step_ev("r1", "a", "running", "success", 1),
        step_ev("r1", "b", None, "running", 1),
        step_ev("r1", "b", "running", "failure", 1),
        run_ev("r1", "running", "failed"),
        run_ev("r1", "failed", "running"),
        step_ev("r1", "b", "failure", "running", 2),
        step_ev("r1", "b", "running", "success", 2),
        run_ev("r1", "running", "completed"),
    ]


def test_events_checkpoint_and_rollback(wf: Workflows, store: Store) -> None:
    run = wf.run("w", "r2")
    with store.events.subscribe(kinds=("run_checkpoint", "step", "run")) as sub:
        with run:
            run.step("a", lambda: 1)
            run.checkpoint("after-a", "a done")
            run.step("b", lambda: 2)
            report = run.rollback("after-a")
        with run:
            run.step("b", lambda: 3)
        got = take_all(sub)
    assert report.discarded_steps == ["b"]
    assert [brief(e) for e in got] == [
        run_ev("r2", "pending", "running"),
        step_ev("r2", "a", None, "running", 1),
        step_ev("r2", "a", "running", "success", 1),
        ("checkpoint", "r2", "after-a", "created"),
        step_ev("r2", "b", None, "running", 1),
        step_ev("r2", "b", "running", "success", 1),
        ("checkpoint", "r2", "after-a", "rolled_back"),  # b's record is removed: no event
        run_ev("r2", "running", "paused"),
        run_ev("r2", "paused", "running"),
        step_ev("r2", "b", None, "running", 1),  # b is new again after the rollback
        step_ev("r2", "b", "running", "success", 1),
        run_ev("r2", "running", "completed"),
    ]
    created, rolled_back = (e for e in got if isinstance(e, RunCheckpointEvent))
    assert created.lsn < rolled_back.lsn
    assert store.get(keys.checkpoint("r2", "after-a"))["description"] == "a done"


def test_events_a_change_that_was_not_committed_announces_nothing(
    wf: Workflows, events: Subscription,
) -> None:
    run = wf.run("w", "r3")
    with pytest.raises(InvalidValueError), run, run.begin("s") as s:
        s.complete(object())  # cbor2 cannot encode it: nothing is written
    got = check_carried_by_commits(take_all(events))
    assert [brief(e) for e in got] == [
        run_ev("r3", None, "pending"),
        run_ev("r3", "pending", "running"),
        step_ev("r3", "s", None, "running", 1),
        step_ev("r3", "s", "running", "failure", 1),  # never "success"
        run_ev("r3", "running", "failed"),
    ]


def test_events_after_reopen_report_against_the_stored_state(store_path: Path) -> None:
    with Store.open(store_path) as s1:
        run = Workflows(s1).run("w", "r4")
        run.start()
        # the process dies in the body (entered in a context of its own, so the
        # step it makes current does not leak into later tests)
        contextvars.copy_context().run(run.begin("charge", idempotent=False).__enter__)
    with Store.open(store_path) as s2:
        run = Workflows(s2).get_run("r4")
        with s2.events.subscribe(kinds=("run", "step")) as sub:
            with pytest.raises(StepNeedsAttentionError), run:
                run.step("charge", lambda: "charged", idempotent=False)
            run.resolve("charge", "succeed", output="charged by hand")
            got = take_all(sub)
    assert [brief(e) for e in got] == [
        step_ev("r4", "charge", "running", "needs_attention", 1),  # run stays running
        run_ev("r4", "running", "paused"),
        step_ev("r4", "charge", "needs_attention", "success", 1),
    ]


def test_events_hydrate_announces_each_seeded_step(wf: Workflows, events: Subscription) -> None:
    wf.hydrate({"x": 1, "y": 2}, "w", "r5")
    got = check_carried_by_commits(take_all(events))
    assert [brief(e) for e in got] == [
        run_ev("r5", None, "pending"),
        step_ev("r5", "x", None, "success", 0),
        step_ev("r5", "y", None, "success", 0),
    ]


def test_events_runs_driven_from_threads_stay_in_commit_order(
    wf: Workflows, events: Subscription,
) -> None:
    steps = ["s1", "s2", "s3", "s4"]

    def drive(run_id: str) -> None:
        with wf.run("w", run_id) as run:
            for sid in steps:
                run.step(sid, str, sid)

    store = wf.store
    with store.events.subscribe(kinds=("run", "step"), prefix=keys.steps("t1")) as t1_steps:
        threads = [threading.Thread(target=drive, args=(f"t{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = check_carried_by_commits(take_all(events))
        only_t1 = take_all(t1_steps)
    assert [brief(e) for e in only_t1] == [brief(e) for e in got
                                           if isinstance(e, StepEvent) and e.run_id == "t1"]
    for i in range(4):
        run_id = f"t{i}"
        expected = [run_ev(run_id, None, "pending"), run_ev(run_id, "pending", "running")]
        for sid in steps:
            expected += [step_ev(run_id, sid, None, "running", 1),
                         step_ev(run_id, sid, "running", "success", 1)]
        expected.append(run_ev(run_id, "running", "completed"))
        mine = [brief(e) for e in got if getattr(e, "run_id", None) == run_id]
        assert mine == expected
