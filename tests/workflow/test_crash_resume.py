"""SIGKILL the process driving a run, hundreds of times: it completes, no success re-runs.

Children forked by the crash harness (tests/crash/) drive a 40-step chained run
with named checkpoints and one rollback (tests/crash/workflow_load.py), logging
their side effects to a ledger file. Each is killed at a seeded moment: in a
step's body, after some step events, at a random time (in the open, the load,
the settling of interrupted steps), or at a kill point inside a commit of a
given phase (the start of a drive, a step's 'running' or 'success' commit, a
checkpoint, the rollback, a needs_attention decision) or at an engine seam.
After every kill the ledger and the reopened store are checked
(tests/crash/workflow_lane.py); the completed run is checked at the end.

Seeded: every failure prints the seed and the command that replays it; the
kill counts are written to the terminal at the end of the module.
"""

from __future__ import annotations

import random
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.crash.children import REPO_ROOT, Zygote
from tests.crash.seeds import crash_seed, seeded
from tests.crash.store_lane import Tally
from tests.crash.summary import KillSummary
from tests.crash.workflow_lane import WorkflowLane, run_problems
from tests.crash.workflow_load import (
    CHAIN_RUN,
    CHAIN_WORKFLOW,
    STEPS,
    check_side_effects,
    expected_outputs,
    step_id,
)
from walsync.engine import Store
from walsync.engine.workflow import RunStatus, Workflows

pytestmark = pytest.mark.crash

SEED = crash_seed()
LANES = 2
KILLS_PER_LANE = 170
#: a run takes at least this many kills (a child gets a few steps done at most)
MIN_KILLS_PER_RUN = 12


def test_crash_resume_random_sigkills_never_rerun_a_success(
    zygote: Zygote, tmp_path: Path, request: pytest.FixtureRequest, kill_summary: KillSummary,
) -> None:
    """Two lanes drive runs to completion, one after the other, until each was killed
    KILLS_PER_LANE times; every run completes with the chain's outputs."""
    with seeded(SEED, request.node.nodeid):
        tally = Tally()
        lanes = [WorkflowLane(zygote, tmp_path / f"lane{i}", str(i),
                              random.Random(f"{SEED}/workflow/{i}"), tally)
                 for i in range(LANES)]
        per_run: list[int] = []

        def drive(lane: WorkflowLane) -> None:
            kills = 0
            while kills < KILLS_PER_LANE:
                n = lane.drive_run()
                per_run.append(n)
                kills += n

        started = time.monotonic()
        with ThreadPoolExecutor(LANES) as pool:
            for future in [pool.submit(drive, lane) for lane in lanes]:
                future.result()
        modes: dict[str, int] = {}
        for lane in lanes:
            for mode, n in lane.kill_points.items():
                modes[mode] = modes.get(mode, 0) + n
        detail = (f"{len(per_run)} runs completed, "
                  + ", ".join(f"{m} {n}" for m, n in sorted(modes.items())))
        kill_summary.add("workflow kills", tally.kills, LANES * KILLS_PER_LANE, detail)
        print(f"\nworkflow crash seed {SEED}: {tally.kills} kills, {detail}; "
              f"{sum(lane.reruns for lane in lanes)} interrupted bodies re-ran; "
              f"{time.monotonic() - started:.1f} s")
        assert tally.kills >= LANES * KILLS_PER_LANE
        assert min(per_run) >= MIN_KILLS_PER_RUN, per_run
        phases = {mode.split(":")[0] for mode in modes}
        assert {"body", "events", "time", "start", "begin", "complete", "checkpoint",
                "rollback", "resolve"} <= phases, modes


# -- the checkers are not vacuous -------------------------------------------------------


def test_crash_checker_flags_body_after_acknowledged_success() -> None:
    ok = check_side_effects(["start 1 0", "body s000 0", "start 2 0", "body s000 0",
                             "committed s000 0", "start 3 0", "recorded s000 0",
                             "body s001 0", "rollback c000 1", "body s000 1"])
    assert ok.violations == []
    assert ok.bodies == {("s000", 0): 2, ("s001", 0): 1, ("s000", 1): 1}
    assert ok.epoch == 1
    after_commit = check_side_effects(["body s000 0", "committed s000 0", "body s000 0"])
    assert len(after_commit.violations) == 1
    assert "s000" in after_commit.violations[0]
    after_load = check_side_effects(["body s004 0", "start 2 0", "recorded s004 0",
                                     "body s004 0"])
    assert len(after_load.violations) == 1
    after_resolve = check_side_effects(["body s009 0", "resolved s009 0 succeed",
                                        "body s009 0"])
    assert len(after_resolve.violations) == 1


def test_crash_checker_flags_a_twice_run_non_idempotent_step_and_a_lost_rollback() -> None:
    twice = check_side_effects(["body s009 0", "start 2 0", "body s009 0"])
    assert twice.violations == [
        "line 3: body s009 0: the non-idempotent s009 ran 2 times in epoch 0"]
    idempotent_twice = check_side_effects(["body s008 0", "start 2 0", "body s008 0"])
    assert idempotent_twice.violations == []
    lost = check_side_effects(["rollback c014 1", "start 7 0"])
    assert len(lost.violations) == 1
    assert "the rollback was lost" in lost.violations[0]


def test_crash_run_checker_flags_a_lost_success_and_a_foreign_output(tmp_path: Path) -> None:
    """The store side of the workflow checker: an acknowledged success that is not in
    the store, and a success whose output is not the chain's, are both reported."""
    outputs = expected_outputs()
    with Store.open(tmp_path / "s") as store:
        run = Workflows(store).run(CHAIN_WORKFLOW, CHAIN_RUN, total_steps=STEPS)
        with run:
            run.step(step_id(0), lambda: outputs[step_id(0)])
            run.step(step_id(1), lambda: "not the chain's")
        ledger = ["start 1 0", "body s000 0", "committed s000 0", "body s001 0",
                  "committed s001 0", "body s002 0", "committed s002 0"]
        problems = run_problems(store, check_side_effects(ledger))
    assert problems == [
        "s001 holds output \"not the chain's\", not the chain's",
        "the acknowledged success of s002 in epoch 0 is lost: no record",
    ]


# ---------------------------------------------------------------- the README's demo


def demo_cmd(store: Path, *extra: str) -> list[str]:
    exe = REPO_ROOT / ".venv" / "bin" / "walsync"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "walsync.sync.cli"]
    return [*base, "demo", "--store", str(store), "--delay", "0", *extra]


def expected_invoices() -> dict[str, int]:
    """What the demo's five pages of four orders add up to, per customer."""
    totals: dict[str, int] = {}
    for page in range(1, 6):
        for i in range(4):
            customer = f"cust-{(page * 7 + i) % 9}"
            totals[customer] = totals.get(customer, 0) + 1000 + page * 137 + i * 59
    return totals


@pytest.mark.parametrize("crash_after", [0, 1, 2, 3, 4])
def test_demo_crash_then_resume_charges_each_customer_once(
    tmp_path: Path, crash_after: int
) -> None:
    store = tmp_path / "demo"
    first = subprocess.run(demo_cmd(store, "--crash-after", str(crash_after)),
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == -signal.SIGKILL, (
        f"{shlex.join(first.args)} exited {first.returncode}: {first.stdout}{first.stderr}")
    assert "SIGKILL inside" in first.stdout
    second = subprocess.run(demo_cmd(store), cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming run" in second.stdout
    assert "completed, progress 100%" in second.stdout

    log = (store / "side-effects.log").read_text().splitlines()
    charges = [line.split() for line in log if line.startswith("charge ")]
    emails = [line.split()[1] for line in log if line.startswith("email ")]
    with Store.open(store) as s:
        runs = Workflows(s).list_runs(workflow="invoices")
        assert len(runs) == 1
        run = Workflows(s).get_run(runs[0].run_id)
        assert run.status == RunStatus.COMPLETED
        invoices = run.output("compute_invoices")
        receipts = run.output("charge_cards")
        assert run.output("email_receipts") == len(invoices)
        assert run.cost.usd > 0
    assert invoices == expected_invoices()  # a resumed fetch neither lost nor repeated a page
    charged = [c[1] for c in charges]
    assert sorted(charged) == sorted(invoices), f"charges: {charges}"
    assert len(set(charged)) == len(charged), f"a customer was charged twice: {charges}"
    assert {c[1]: int(c[2]) for c in charges} == invoices
    assert sorted(emails) == sorted(receipts), f"emails: {emails}"
