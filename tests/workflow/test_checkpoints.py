"""Checkpoints, rollback, restoration, migrations and retention (README: adopting)."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest

from tests.workflow._internal import delete_internal, put_internal
from walsync.engine import Store
from walsync.engine.errors import CheckpointNotFoundError, RunNotFoundError, SchemaVersionError
from walsync.engine.workflow import (
    RetentionPolicy,
    Run,
    RunState,
    RunStatus,
    StepRecord,
    StepStatus,
    Workflows,
    current_step,
    keys,
    utcnow,
)


class Bodies:
    """Step bodies that count their calls per step id and charge a cost."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def __call__(self, sid: str, value: Any = None, usd: float = 0.0) -> Any:
        self.calls[sid] = self.calls.get(sid, 0) + 1
        if usd:
            current_step().add_cost(usd=usd, tokens_in=10)
        return value if value is not None else f"out-{sid}"


def drive(run: Run, bodies: Bodies, sids: list[str], usd: float = 0.0) -> list[Any]:
    with run:
        return [run.step(sid, bodies, sid, None, usd) for sid in sids]


# ---------------------------------------------------------------- checkpoints


def test_run_checkpoints_listed_oldest_first_with_description_and_tags(wf: Workflows) -> None:
    run = wf.run("w", "r")
    bodies = Bodies()
    with run:
        run.step("a", bodies, "a")
        run.checkpoint("zeta", "after a", tags=["nightly", "pre-merge"])
        run.step("b", bodies, "b")
        run.checkpoint("alpha", "after b")
        run.step("c", bodies, "c")
        run.checkpoint("mid", tags=("t",))
    cps = run.checkpoints()
    assert [c.name for c in cps] == ["zeta", "alpha", "mid"]
    assert [c.description for c in cps] == ["after a", "after b", ""]
    assert [c.tags for c in cps] == [["nightly", "pre-merge"], [], ["t"]]
    assert [c.steps for c in cps] == [1, 2, 3]
    assert {c.status for c in cps} == {"running"}
    assert cps[0].created_at < cps[1].created_at < cps[2].created_at
    assert [c.name for c in wf.get_run("r").checkpoints()] == ["zeta", "alpha", "mid"]
    with pytest.raises(ValueError, match="checkpoint name"):
        run.checkpoint("a/b")


def test_run_checkpoint_is_durable_after_reopen(store_path: Path) -> None:
    with Store.open(store_path) as s1:
        run = Workflows(s1).run("w", "r")
        with run:
            run.step("a", Bodies(), "a")
            run.checkpoint("cp", "desc", tags=["x"])
    with Store.open(store_path) as s2:
        cps = Workflows(s2).get_run("r").checkpoints()
        assert [(c.name, c.description, c.tags, c.steps) for c in cps] == [
            ("cp", "desc", ["x"], 1)
        ]


def test_run_rollback_reverts_steps_and_run_and_keeps_discarded(store_path: Path) -> None:
    bodies = Bodies()
    with Store.open(store_path) as s1:
        wf = Workflows(s1, inline_output_bytes=256)
        run = wf.run("w", "r", total_steps=4, metadata={"owner": "me"})
        with run:
            run.step("a", bodies, "a", None, 0.5)
            run.step("b", bodies, "b", None, 0.5)
            run.checkpoint("two-done")
            run.step("c", bodies, "c", "C" * 1000, 0.5)
            run.step("d", bodies, "d", None, 0.5)
        assert run.status == RunStatus.COMPLETED
        old_c_key = run.steps["c"].output_key
        assert old_c_key is not None
        cost_before = run.cost

        report = run.rollback("two-done")
        assert report.checkpoint == "two-done"
        assert report.rollback == 1
        assert sorted(report.discarded_steps) == ["c", "d"]
        assert report.reverted_steps == []
        assert sorted(run.steps) == ["a", "b"]
        assert run.record.steps_done == 2
        assert run.record.progress == 50.0
        assert run.status == RunStatus.PAUSED
        assert run.record.metadata["rolled_back_to"] == "two-done"
        assert run.record.metadata["owner"] == "me"
        assert run.cost == cost_before  # money spent is not rolled back

    with Store.open(store_path) as s2:
        wf = Workflows(s2, inline_output_bytes=256)
        run = wf.get_run("r")
        assert sorted(run.steps) == ["a", "b"]
        assert s2.get(keys.step("r", "c")) is None
        assert wf.validate(run.state()) == []
        discarded = run.discarded()
        assert list(discarded) == [1]
        assert sorted(discarded[1]) == ["c", "d"]
        assert discarded[1]["c"]["status"] == "success"
        assert discarded[1]["c"]["output_key"] == old_c_key
        assert discarded[1]["d"]["output"] == "out-d"

        # The next drive runs the steps after the checkpoint again, not before.
        with run:
            got = [run.step("a", bodies, "a"), run.step("b", bodies, "b"),
                   run.step("c", bodies, "c", "D" * 1000, 0.25),
                   run.step("d", bodies, "d", None, 0.25)]
        assert got == ["out-a", "out-b", "D" * 1000, "out-d"]
        assert bodies.calls == {"a": 1, "b": 1, "c": 2, "d": 2}
        assert run.status == RunStatus.COMPLETED
        assert run.cost.usd == pytest.approx(2.0 + 0.5)
        assert run.output("c") == "D" * 1000
        # The discarded record's large output is still the one it pointed at.
        assert s2.get(discarded[1]["c"]["output_key"]) == "C" * 1000
        assert run.discarded()[1]["c"] == discarded[1]["c"]


def test_run_rollback_reverts_changed_step_records(wf: Workflows) -> None:
    run = wf.run("w", "r")
    flaky_calls = 0

    def flaky() -> str:
        nonlocal flaky_calls
        flaky_calls += 1
        if flaky_calls == 1:
            raise RuntimeError("first attempt fails")
        return "ok"

    def first_drive() -> None:
        with run:
            run.step("a", lambda: "A")
            run.step("flaky", flaky)

    with pytest.raises(RuntimeError):
        first_drive()
    run = wf.get_run("r")
    run.checkpoint("after-failure")
    with run:
        run.step("a", lambda: "A")
        run.step("flaky", flaky)
    assert run.steps["flaky"].status == StepStatus.SUCCESS
    report = run.rollback("after-failure")
    assert report.reverted_steps == ["flaky"]
    assert report.discarded_steps == ["flaky"]
    assert run.steps["flaky"].status == StepStatus.FAILURE
    assert wf.store.get(keys.step("r", "flaky"))["status"] == "failure"
    assert run.discarded()[1]["flaky"]["status"] == "success"
    assert run.status == RunStatus.PAUSED
    # Two rollbacks keep two generations of discarded records.
    with run:
        run.step("flaky", flaky)
    run.rollback("after-failure")
    assert sorted(run.discarded()) == [1, 2]


def test_run_rollback_to_unknown_checkpoint_raises(wf: Workflows) -> None:
    run = wf.run("w", "r")
    with run:
        run.step("a", lambda: 1)
    with pytest.raises(CheckpointNotFoundError, match="nope"):
        run.rollback("nope")
    assert run.status == RunStatus.COMPLETED
    assert run.discarded() == {}


# ---------------------------------------------------------------- restoration protocol


def test_workflows_recover_without_state_starts_fresh(wf: Workflows) -> None:
    got = wf.recover("r", "w", inputs={"x": 1})
    assert got.outcome == "fresh"
    assert "no saved state" in got.reason
    assert got.run.status == RunStatus.PENDING
    assert got.run.record.inputs == {"x": 1}
    assert got.run.record.restoration_count == 0
    assert got.pending_questions == []
    assert got.waiting_steps == []
    assert wf.get_run("r").run_id == "r"


def test_the_old_names_of_recover_and_reverted_steps_still_answer_with_a_warning(
        wf: Workflows) -> None:
    """"restore" is the sync layer's host-loss restore alone: the workflow layer's
    restore is recover, and a rollback reverts steps (README's glossary)."""
    with pytest.warns(DeprecationWarning, match="recover"):
        got = wf.restore("r", "w")
    assert got.outcome == "fresh"
    with got.run as run:
        run.step("a", lambda: 1)
        run.checkpoint("cp")
        run.step("b", lambda: 2)
    report = wf.get_run("r").rollback("cp")
    with pytest.warns(DeprecationWarning, match="reverted_steps"):
        assert report.restored_steps == report.reverted_steps == []


def test_workflows_recover_valid_state_counts_and_hands_back_work(store_path: Path) -> None:
    questions = [{"id": "q1", "text": "approve the refund?"}]
    with Store.open(store_path) as s1:
        wf = Workflows(s1)
        run = wf.run("w", "r", metadata={"pending_questions": questions, "tasks": ["t1"]})
        with run:
            run.step("a", lambda: 1)
            run.pause("waiting for answers")
        put_internal(s1, keys.step("r", "b"),
                     StepRecord("b", StepStatus.PENDING.value, seq=5).to_dict())
        put_internal(s1, keys.step("r", "c"),
                     StepRecord("c", StepStatus.RUNNING.value, seq=6, idempotent=False).to_dict())
        before = utcnow()
        got = wf.recover("r", "w", source="supervisor-restart")
        assert got.outcome == "recovered"
        assert got.problems == []
        assert got.pending_questions == questions
        assert got.waiting_steps == ["b", "c"]
        assert got.run.record.restoration_count == 1
        assert got.run.record.restoration_source == "supervisor-restart"
        assert got.run.record.last_restored_at is not None
        assert got.run.record.last_restored_at >= before
        assert got.run.record.metadata["tasks"] == ["t1"]
    with Store.open(store_path) as s2:
        wf = Workflows(s2)
        again = wf.recover("r", "w", source="second-restart")
        assert again.outcome == "recovered"
        assert again.run.record.restoration_count == 2
        assert again.run.record.restoration_source == "second-restart"
        stored = wf.get_run("r").record
        assert stored.restoration_count == 2
        assert stored.last_restored_at == again.run.record.last_restored_at


def _run_with_checkpoints(wf: Workflows) -> Run:
    """Steps s0..s3, checkpoints 'two' (2 done) and 'three' (3 done)."""
    run = wf.run("w", "r")
    with run:
        for i in range(4):
            run.step(f"s{i}", lambda i=i: i)
            if i == 1:
                run.checkpoint("two")
            if i == 2:
                run.checkpoint("three")
        run.pause()
    return run


def _at_most_two_done(state: RunState) -> list[str]:
    done = state["run"]["steps_done"]
    return [] if done <= 2 else [f"{done} steps done, at most 2 allowed"]


def test_workflows_recover_invalid_by_validator_uses_newest_valid_checkpoint(
    wf: Workflows,
) -> None:
    _run_with_checkpoints(wf)
    got = wf.recover("r", "w", validator=_at_most_two_done, source="sup")
    assert got.outcome == "checkpoint"
    assert "two" in got.reason
    assert got.problems == ["4 steps done, at most 2 allowed"]
    assert sorted(got.run.steps) == ["s0", "s1"]
    assert got.run.record.restoration_count == 1
    assert got.run.record.restoration_source == "sup"
    assert got.run.record.metadata["rolled_back_to"] == "two"
    assert sorted(got.run.discarded()[1]) == ["s2", "s3"]
    assert wf.validate(wf.get_run("r").state(), _at_most_two_done) == []


@pytest.mark.parametrize("verdict", ["false", "raise", "list"])
def test_workflows_validate_accepts_every_validator_form(wf: Workflows, verdict: str) -> None:
    run = _run_with_checkpoints(wf)

    def validator(state: RunState) -> Any:
        if state["run"]["steps_done"] <= 3:
            return True if verdict != "list" else []
        if verdict == "false":
            return False
        if verdict == "raise":
            raise ValueError("too far along")
        return ["too far along"]

    problems = wf.validate(run.state(), validator)
    assert len(problems) == 1
    got = wf.recover("r", "w", validator=validator)
    assert got.outcome == "checkpoint"
    assert sorted(got.run.steps) == ["s0", "s1", "s2"]


@pytest.mark.parametrize("broken", ["step-status", "run-status", "steps-done", "output"])
def test_workflows_recover_structurally_broken_state_uses_checkpoint(
    wf: Workflows, broken: str
) -> None:
    wf.inline_output_bytes = 64
    run = _run_with_checkpoints(wf)
    store = wf.store
    if broken == "step-status":
        raw = store.get(keys.step("r", "s3"))
        put_internal(store, keys.step("r", "s3"), {**raw, "status": "exploded"})
    elif broken == "run-status":
        put_internal(store, keys.run("r"), {**store.get(keys.run("r")), "status": "limbo"})
    elif broken == "steps-done":
        put_internal(store, keys.run("r"), {**store.get(keys.run("r")), "steps_done": 99})
    else:
        with run:
            run.step("big", lambda: "x" * 500)
            run.pause()
        delete_internal(store, run.steps["big"].output_key)  # type: ignore[arg-type]
    got = wf.recover("r", "w")
    assert got.outcome == "checkpoint"
    assert got.problems, "the broken state must be reported"
    assert sorted(got.run.steps) == ["s0", "s1", "s2"]
    assert got.run.status in (RunStatus.PAUSED, RunStatus.PENDING)
    assert wf.validate(wf.get_run("r").state()) == []


def test_workflows_recover_invalid_without_valid_checkpoint_starts_fresh(
    wf: Workflows,
) -> None:
    run = wf.run("w", "r", inputs={"day": 1})
    with run:
        run.step("a", lambda: "A")
        run.step("b", lambda: "B")
        run.pause()
    store = wf.store
    put_internal(store, keys.step("r", "b"), {**store.get(keys.step("r", "b")), "status": "???"})
    got = wf.recover("r", "w", inputs={"day": 2})
    assert got.outcome == "fresh"
    assert "step 'b' has unknown status '???'" in got.problems
    assert got.run.steps == {}
    assert got.run.status == RunStatus.PENDING
    assert got.run.record.inputs == {"day": 2}
    assert store.get(keys.step("r", "a")) is None
    kept = got.run.discarded()
    assert list(kept) == [1]
    assert kept[1]["__run__"]["inputs"] == {"day": 1}
    assert kept[1]["b"]["status"] == "???"
    assert kept[1]["a"]["output"] == "A"

    # The fresh run's own rollbacks do not overwrite the kept invalid state.
    fresh = got.run
    with fresh:
        fresh.step("a", lambda: "A2")
        fresh.checkpoint("one")
        fresh.step("b", lambda: "B2")
    fresh.rollback("one")
    history = fresh.discarded()
    assert history[1]["b"]["status"] == "???"
    assert history[1]["__run__"]["inputs"] == {"day": 1}
    assert [rec["output"] for n, recs in history.items() if n != 1
            for sid, rec in recs.items() if sid == "b"] == ["B2"]


def test_workflows_recover_rejects_all_invalid_checkpoints(wf: Workflows) -> None:
    _run_with_checkpoints(wf)

    def nothing_valid(state: RunState) -> bool:
        return False

    got = wf.recover("r", "w", validator=nothing_valid)
    assert got.outcome == "fresh"
    assert got.run.steps == {}


# ---------------------------------------------------------------- schema migrations


def _v1_to_v2(state: RunState) -> RunState:
    state["run"]["metadata"]["units"] = "cents"
    for rec in state["steps"].values():
        if isinstance(rec.get("output"), int):
            rec["output"] = rec["output"] * 100
    return state


def test_workflows_migration_upgrades_v1_state_once(store_path: Path) -> None:
    with Store.open(store_path) as s1:
        run = Workflows(s1).run("w", "r")
        assert run.record.schema_version == 1
        with run:
            run.step("price", lambda: 12)
            run.pause()
    calls: list[int] = []

    def m1(state: RunState) -> RunState:
        calls.append(state["run"]["schema_version"])
        return _v1_to_v2(state)

    with Store.open(store_path) as s2:
        wf = Workflows(s2, migrations=[m1])
        assert wf.schema_version == 2
        run = wf.get_run("r")
        assert run.record.schema_version == 2
        assert run.record.metadata["units"] == "cents"
        assert run.output("price") == 1200
        assert s2.get(keys.run("r"))["schema_version"] == 2
        assert s2.get(keys.step("r", "price"))["output"] == 1200
        version = s2.get_version(keys.run("r"))
        step_version = s2.get_version(keys.step("r", "price"))
        again = wf.get_run("r")
        assert again.output("price") == 1200
        assert s2.get_version(keys.run("r")) == version
        assert s2.get_version(keys.step("r", "price")) == step_version
        # The upgraded run keeps working: it can be driven on.
        with again:
            assert again.step("price", lambda: 0) == 1200
    with Store.open(store_path) as s3:
        Workflows(s3, migrations=[m1]).get_run("r")
    assert calls == [1]


def test_workflows_migration_chain_and_checkpoint_states(store_path: Path) -> None:
    with Store.open(store_path) as s1:
        run = Workflows(s1).run("w", "r")
        with run:
            run.step("price", lambda: 3)
            run.checkpoint("v1-cp")
            run.step("more", lambda: 4)

    def m2(state: RunState) -> RunState:
        state["run"]["metadata"]["v3"] = True
        return state

    with Store.open(store_path) as s2:
        wf = Workflows(s2, migrations=[_v1_to_v2, m2])
        run = wf.get_run("r")
        assert run.record.schema_version == 3
        assert run.record.metadata == {"units": "cents", "v3": True}
        assert run.output("more") == 400
        run.rollback("v1-cp")  # a checkpoint written at version 1 is upgraded too
        assert run.record.schema_version == 3
        assert run.output("price") == 300
        assert sorted(run.steps) == ["price"]


def test_workflows_state_newer_than_code_raises(store_path: Path) -> None:
    with Store.open(store_path) as s1:
        Workflows(s1, migrations=[_v1_to_v2, _v1_to_v2]).run("w", "r")
    with Store.open(store_path) as s2:
        with pytest.raises(SchemaVersionError) as info:
            Workflows(s2).get_run("r")
        message = str(info.value)
        assert "version 3" in message
        assert "up to 1" in message
        with pytest.raises(SchemaVersionError, match="up to 2"):
            Workflows(s2, migrations=[_v1_to_v2]).get_run("r")
        # Nothing was written: the newer code still reads it.
        assert s2.get(keys.run("r"))["schema_version"] == 3


# ---------------------------------------------------------------- retention


def _finished_run(wf: Workflows, run_id: str, status: str) -> None:
    run = wf.run("w", run_id)
    if status == "running":
        run.start()
        run.step("a", lambda: "x" * 300)
        return
    if status == "failed":
        def failing_drive() -> None:
            with run:
                run.step("a", lambda: "x" * 300)
                raise RuntimeError("failed")

        with pytest.raises(RuntimeError):
            failing_drive()
        return
    with run:
        run.step("a", lambda: "x" * 300)
        run.checkpoint("cp")
        run.step("b", lambda: 2)
    run.rollback("cp")
    with run:
        run.step("b", lambda: 2)
    if status == "cancelled":
        run.cancel()


def test_workflows_retention_removes_old_finished_runs_with_all_keys(
    fast_store: Store,
) -> None:
    wf = Workflows(fast_store, inline_output_bytes=64)
    for run_id, status in (("old-done", "completed"), ("old-failed", "failed"),
                           ("old-cancelled", "cancelled"), ("old-running", "running")):
        _finished_run(wf, run_id, status)
    old_paused = wf.run("w", "old-paused")
    with old_paused:
        old_paused.pause()
    doomed_keys = {rid: fast_store.keys(keys.all_of_run(rid))
                   for rid in ("old-done", "old-failed", "old-cancelled")}
    assert any("/outputs/" in k for k in doomed_keys["old-done"])
    assert any("/checkpoints/" in k for k in doomed_keys["old-done"])
    assert any("/discarded/" in k for k in doomed_keys["old-done"])
    boundary = utcnow()
    time.sleep(0.05)
    _finished_run(wf, "young-done", "completed")
    _finished_run(wf, "young-failed", "failed")

    report = wf.apply_retention(RetentionPolicy(max_age_seconds=0.02),
                                now=boundary + dt.timedelta(seconds=0.03))
    assert sorted(report.runs_removed) == ["old-cancelled", "old-done", "old-failed"]
    assert report.keys_removed == sum(len(k) + 2 for k in doomed_keys.values())
    for rid in report.runs_removed:
        assert fast_store.keys(keys.all_of_run(rid)) == []
        assert fast_store.get(keys.run(rid)) is None
        assert fast_store.get(keys.index(rid)) is None
        with pytest.raises(RunNotFoundError):
            wf.get_run(rid)
    assert sorted(r.run_id for r in wf.list_runs()) == [
        "old-paused", "old-running", "young-done", "young-failed",
    ]
    assert wf.get_run("young-done").output("a") == "x" * 300
    assert wf.get_run("old-running").steps["a"].status == StepStatus.SUCCESS
    # A second pass finds nothing more; a policy on 'completed' only spares failed runs.
    assert wf.apply_retention(RetentionPolicy(max_age_seconds=0.02),
                              now=boundary + dt.timedelta(seconds=0.03)).runs_removed == []
    later = utcnow() + dt.timedelta(hours=1)
    only_done = wf.apply_retention(RetentionPolicy(3600 * 0.5, statuses=("completed",)),
                                   now=later)
    assert only_done.runs_removed == ["young-done"]
    assert [r.run_id for r in wf.list_runs(status="failed")] == ["young-failed"]
    fast_store.checkpoint()
