"""Cost a step reports with ``add_cost`` is durable with the step's progress: a process
killed by SIGKILL mid-step, after the model API answered and before any later progress,
loses none of it from the run's totals (a real SIGKILL, a real resume).

The child spends in rounds, each an ``add_cost`` of known amounts, then kills itself at a
chosen round; the parent resumes the run and checks the totals are every killed round's
plus the resumed attempt's, for every kill point.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from walsync.engine import Store
from walsync.engine.workflow import RunStatus, Workflows, current_step

pytestmark = pytest.mark.crash

ROUNDS = 4
TOKENS_IN, TOKENS_OUT, USD = 1200, 380, 0.0104

CHILD = f"""
import os, signal, sys
from walsync.engine import Store
from walsync.engine.workflow import Workflows, current_step

path, kill_at, with_progress = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"

def spend():
    ctx = current_step()
    for n in range(1, {ROUNDS} + 1):
        ctx.add_cost(tokens_in={TOKENS_IN}, tokens_out={TOKENS_OUT}, usd={USD}, calls=1)
        if with_progress and n % 2 == 0:
            ctx.progress(n / {ROUNDS}, cursor=n)
        if n == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return "done"

store = Store.open(path)
wf = Workflows(store)
run = wf.run("summaries", "r1", total_steps=2)
with run:
    run.step("warm", lambda: "ok")
    run.step("summarise", spend)
"""


def spend_again() -> str:
    current_step().add_cost(tokens_in=TOKENS_IN, tokens_out=TOKENS_OUT, usd=USD, calls=1)
    return "done"


@pytest.mark.parametrize("with_progress", [False, True], ids=["cost-only", "with-progress"])
@pytest.mark.parametrize("kill_at", range(1, ROUNDS + 1))
def test_cost_spent_before_sigkill_counts_after_resume(tmp_path: Path, kill_at: int,
                                                      with_progress: bool) -> None:
    path = tmp_path / "s"
    child = subprocess.run([sys.executable, "-c", CHILD, str(path), str(kill_at),
                            "1" if with_progress else "0"],
                           capture_output=True, text=True, timeout=120, check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr

    with Store.open(path) as store:
        run = Workflows(store).get_run("r1")
        killed = run.steps["summarise"]
        assert killed.status == "running"  # the attempt was cut off mid-step
        assert killed.cost["tokens_in"] == kill_at * TOKENS_IN  # on disk before resuming
        with run:
            run.step("warm", lambda: "never again")
            run.step("summarise", spend_again)
        assert run.status == RunStatus.COMPLETED

    with Store.open(path, readonly=True) as store:
        run = Workflows(store).get_run("r1")
        spent = kill_at + 1  # the killed attempt's rounds and the resumed attempt's one
        assert run.cost.tokens_in == spent * TOKENS_IN
        assert run.cost.tokens_out == spent * TOKENS_OUT
        assert run.cost.usd == pytest.approx(spent * USD)
        assert run.cost.counters == {"calls": spent}
        step = run.steps["summarise"]
        assert step.cost["tokens_in"] == spent * TOKENS_IN
        assert step.attempts == 2
