"""SIGKILL a process driving a run, many times; the run completes, no success re-runs.

The child (tests/workflow/_child.py ``drive``) drives a 50-step chained run and
logs to a side-effect ledger (append mode, fsync per line): ``recorded s``
for each step it found 'success' when it loaded the run, ``body s`` when a
step's body runs, ``committed s`` after ``run.step`` returned. A ``body s``
line after a ``recorded s`` or ``committed s`` line means the body of a step
already recorded 'success' ran again: the one thing resuming must never do.
A step may show several ``body`` lines only while its success was not yet
committed. Every 10th step is not idempotent: the child resolves it from the
ledger after a kill, so its body runs exactly once.

Seeded: the seed is printed, with a command that replays it, on failure.
"""

from __future__ import annotations

import os
import random
import select
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine import Store, verify
from engine.runs import RunStatus, StepStatus
from engine.workflow import Workflows
from tests.workflow._child import CHAIN_RUN, expected_outputs, is_idempotent, step_id

pytestmark = pytest.mark.crash

CHILD = Path(__file__).resolve().parent / "_child.py"
REPO_ROOT = Path(__file__).resolve().parents[2]
THIS_FILE = "tests/workflow/test_crash_resume.py"
STEPS = 50
MIN_KILLS = 15
#: how a kill is timed: after the child reports 1..MAX_EVENTS step events
#: (a body started, a success committed) plus up to MAX_EVENT_DELAY_SECONDS,
#: or at a time up to MAX_TIME_DELAY_SECONDS after "go" (this one may land in
#: the store's open and recovery). Every step body sleeps BODY_SECONDS
#: (8 ms), so a child gets at most ~3 steps done: 50 steps take >= 16 kills.
MAX_EVENTS = 4
MAX_EVENT_DELAY_SECONDS = 0.006
MAX_TIME_DELAY_SECONDS = 0.025
MAX_CHILDREN = 400
CHILD_TIMEOUT_SECONDS = 60.0


def crash_seed() -> int:
    text = os.environ.get("WALSYNC_CRASH_SEED", "").strip()
    return int(text) if text else random.SystemRandom().randrange(1, 2**31)


SEED = crash_seed()


def replay_hint(test_name: str) -> str:
    return (f"seed {SEED}; replay: WALSYNC_CRASH_SEED={SEED} .venv/bin/python -m pytest "
            f"'{THIS_FILE}::{test_name}'")


@dataclass
class LedgerCheck:
    violations: list[str] = field(default_factory=list)
    bodies: dict[str, int] = field(default_factory=dict)
    committed: set[str] = field(default_factory=set)
    starts: int = 0


def check_ledger(lines: list[str]) -> LedgerCheck:
    """Find body lines of steps already acknowledged as 'success' (see module doc)."""
    out = LedgerCheck()
    acked: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        word, _, rest = line.partition(" ")
        if word == "start":
            out.starts += 1
        elif word in ("recorded", "committed"):
            acked.setdefault(rest, f"line {n}: {line}")
            if word == "committed":
                out.committed.add(rest)
        elif word == "body":
            out.bodies[rest] = out.bodies.get(rest, 0) + 1
            if rest in acked:
                out.violations.append(
                    f"line {n}: body of {rest} ran after its success was acknowledged "
                    f"({acked[rest]})"
                )
    return out


def test_crash_checker_flags_body_after_acknowledged_success() -> None:
    ok = check_ledger(["start 1", "body s000", "start 2", "body s000", "committed s000",
                       "start 3", "recorded s000", "body s001"])
    assert ok.violations == []
    assert ok.bodies == {"s000": 2, "s001": 1}
    after_commit = check_ledger(["body s000", "committed s000", "body s000"])
    assert len(after_commit.violations) == 1
    assert "s000" in after_commit.violations[0]
    after_load = check_ledger(["body s004", "start 2", "recorded s004", "body s004"])
    assert len(after_load.violations) == 1


def read_until(proc: subprocess.Popen[bytes], word: bytes, deadline: float) -> bool:
    """True when the child printed ``word``; False if it exited first."""
    assert proc.stdout is not None
    buf = b""
    while word not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"child did not say {word!r} in time")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                return False
            buf += chunk
    return True


def wait_for_events(proc: subprocess.Popen[bytes], events: int, deadline: float) -> None:
    """Return once the child printed ``events`` step events, exited, or time ran out."""
    assert proc.stdout is not None
    seen = 0
    while seen < events:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                return
            seen += chunk.count(b"\n")


def spawn_driver(store_path: Path, ledger: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), "drive", str(store_path), str(ledger), str(STEPS)],
        cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def reap(proc: subprocess.Popen[bytes]) -> str:
    """Kill (if still alive) and wait for a child; close its pipes; return its stderr."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=CHILD_TIMEOUT_SECONDS)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    return err


def test_crash_resume_random_sigkills_never_rerun_a_success(tmp_path: Path) -> None:
    name = "test_crash_resume_random_sigkills_never_rerun_a_success"
    rng = random.Random(SEED)
    store_path = tmp_path / "store"
    ledger = tmp_path / "side-effects.log"
    kills = completed_at = 0
    # Created here, not by a child: a SIGKILL inside Store.open's first-time
    # initialisation leaves a directory that later opens refuse (an engine
    # issue, reported separately); this suite is about the workflow layer.
    Store.open(store_path).close()
    ledger.touch()
    upcoming = spawn_driver(store_path, ledger)
    try:
        for child in range(MAX_CHILDREN):
            proc = upcoming
            try:
                deadline = time.monotonic() + CHILD_TIMEOUT_SECONDS
                assert read_until(proc, b"LOADED", deadline), reap(proc)
                # The next child imports while this one runs; it opens the
                # store only when told to, after this one is dead.
                upcoming = spawn_driver(store_path, ledger)
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                proc.stdin.flush()
                if rng.random() < 0.3:
                    delay = rng.uniform(0.0, MAX_TIME_DELAY_SECONDS)
                else:
                    wait_for_events(proc, rng.randint(1, MAX_EVENTS), deadline)
                    delay = rng.uniform(0.0, MAX_EVENT_DELAY_SECONDS)
                try:
                    proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=CHILD_TIMEOUT_SECONDS)
            finally:
                err = reap(proc)
            violations = check_ledger(ledger.read_text().split("\n")).violations
            assert violations == [], f"after child {child}: " + "\n".join(violations[:20])
            if proc.returncode == -signal.SIGKILL:
                kills += 1
                continue
            assert proc.returncode == 0, f"child {child} exited {proc.returncode}: {err}"
            completed_at = child
            break
        else:
            pytest.fail(f"the run did not complete in {MAX_CHILDREN} children")

        lines = ledger.read_text().split("\n")
        result = check_ledger(lines)
        assert result.violations == [], "\n".join(result.violations[:20])
        assert kills >= MIN_KILLS, f"only {kills} kills before the run completed"
        assert lines[-2] == "done"
        expected = expected_outputs(STEPS)
        for i in range(STEPS):
            sid = step_id(i)
            assert result.bodies.get(sid, 0) >= 1, f"{sid} never ran"
            if not is_idempotent(i):
                assert result.bodies[sid] == 1, f"non-idempotent {sid} ran {result.bodies[sid]}x"
        assert verify(store_path).ok
        with Store.open(store_path) as store:
            run = Workflows(store).get_run(CHAIN_RUN)
            assert run.status == RunStatus.COMPLETED
            assert run.record.steps_done == STEPS
            assert run.record.progress == 100.0
            assert [s.step_id for s in run.ordered_steps()] == list(expected)
            assert all(s.status == StepStatus.SUCCESS for s in run.steps.values())
            assert run.snapshot() == expected
        reruns = sum(n - 1 for n in result.bodies.values())
        print(f"\nworkflow crash seed {SEED}: {kills} kills, {result.starts} starts, "
              f"completed by child {completed_at}, {reruns} interrupted bodies re-ran")
    except BaseException:
        print(f"\n{replay_hint(name)}")
        raise
    finally:
        reap(upcoming)


# ---------------------------------------------------------------- the README's demo


def demo_cmd(store: Path, *extra: str) -> list[str]:
    exe = REPO_ROOT / ".venv" / "bin" / "walsync"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "sync.cli"]
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
