"""An async run killed with SIGKILL resumes under the sync API, and a sync run under the
async one: no completed step runs again, the interrupted ones run from their cursor, a
non-idempotent step caught running waits for a decision (README's resume table, both ways)."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.aio._run_child import CHARGE_AFTER, STEPS
from walsync.engine import Store
from walsync.engine.errors import StepNeedsAttentionError
from walsync.engine.workflow import (
    RunStatus,
    StepStatus,
    Workflows,
    current_async_step,
    current_step,
)

CHILD = Path(__file__).resolve().parent / "_run_child.py"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _kill_after(mode: str, store_path: Path, log: Path, lines: int) -> list[str]:
    """Run the child in ``mode`` and SIGKILL it once it printed ``lines`` lines
    (0: once it started the charge)."""
    seen: list[str] = []
    with subprocess.Popen(
        [sys.executable, str(CHILD), mode, str(store_path), str(log)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            while lines == 0 or len(seen) < lines:
                line = proc.stdout.readline()
                if not line:
                    break
                seen.append(line.strip())
                if lines == 0 and seen[-1] == "STEP charge":
                    break
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=60)
            if proc.stderr is not None and proc.returncode not in (-signal.SIGKILL, 0):
                pytest.fail(f"child failed: {proc.stderr.read()}")
    return seen


def _resume_sync(store: Store, ran: list[str], cursors: dict[int, Any]) -> None:
    def body(i: int) -> int:
        ran.append(str(i))
        cursors[i] = current_step().cursor
        return i * i

    def charge() -> str:
        ran.append("charge")
        return "charged"

    run = Workflows(store).get_run("r")
    with run:
        for i in range(STEPS):
            if i == CHARGE_AFTER:
                run.step("charge", charge, idempotent=False)
            run.step(f"s{i:02d}", body, i)


def _resume_async(store: Store, ran: list[str], cursors: dict[int, Any]) -> None:
    async def body(i: int) -> int:
        ran.append(str(i))
        cursors[i] = current_async_step().cursor
        await asyncio.sleep(0)
        return i * i

    async def charge() -> str:
        ran.append("charge")
        return "charged"

    async def main() -> None:
        async with Workflows(store).arun("w", "r") as run:
            for first in range(0, STEPS, 5):
                if first == CHARGE_AFTER:
                    await run.step("charge", charge, idempotent=False)
                await asyncio.gather(*(run.step(f"s{i:02d}", body, i)
                                       for i in range(first, first + 5)))

    asyncio.run(main())


RESUME = {"sync": _resume_sync, "async": _resume_async}


@pytest.mark.parametrize(("killed", "resumed"), [("async", "sync"), ("sync", "async")])
def test_aio_run_killed_mid_run_resumes_under_the_other_api(
        tmp_path: Path, killed: str, resumed: str) -> None:
    rng = random.Random(f"{killed}-{resumed}")
    for round_ in range(4):
        store_path, log = tmp_path / f"store{round_}", tmp_path / f"log{round_}"
        printed = _kill_after(killed, store_path, log, rng.randint(1, STEPS) if round_ else 0)
        assert printed, "the child printed nothing before it was killed"
        started_in_child = log.read_text().split("\n")
        with Store.open(store_path) as store:
            before = Workflows(store).get_run("r")
            succeeded = {sid for sid, s in before.steps.items() if s.status == StepStatus.SUCCESS}
            charge = before.steps.get("charge")
            charge_interrupted = charge is not None and charge.status == StepStatus.RUNNING
            ran: list[str] = []
            cursors: dict[int, Any] = {}
            if charge_interrupted:
                with pytest.raises(StepNeedsAttentionError):
                    RESUME[resumed](store, ran, cursors)
                paused = Workflows(store).get_run("r")
                assert paused.status == RunStatus.PAUSED
                assert "charge" not in ran
                paused.resolve("charge", "succeed", "charged")
            again: list[str] = []
            RESUME[resumed](store, again, cursors)
            ran += again
            after = Workflows(store).get_run("r")
            assert after.status == RunStatus.COMPLETED
            assert after.record.steps_done == STEPS + 1
            assert after.snapshot() == {"charge": "charged",
                                        **{f"s{i:02d}": i * i for i in range(STEPS)}}
        # no completed step ran again; every other one ran (once it is idempotent)
        expected = {str(int(sid[1:])) if sid != "charge" else sid
                    for sid in {f"s{i:02d}" for i in range(STEPS)} | {"charge"}
                    if sid not in succeeded}
        if charge_interrupted:
            expected.discard("charge")
        assert set(ran) == expected, (killed, resumed, printed[-1], sorted(succeeded))
        if round_ == 0:
            assert charge_interrupted, "the kill in the charge's body did not catch it running"
        assert len(ran) == len(set(ran))
        # the charge ran once in all (caught running, it ran before the decision only)
        assert started_in_child.count("start charge") + ran.count("charge") == 1
        for i, cursor in cursors.items():
            assert cursor in (None, i), (i, cursor)
