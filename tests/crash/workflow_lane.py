"""A workflow run driven to completion by children that are killed again and again.

:class:`WorkflowLane` forks a child (tests/crash/workflow_load.py) per attempt,
kills it as a seeded :class:`WorkflowKill` says, and after every kill checks:

* the side-effect ledger (no completed step ran again; a non-idempotent step
  ran at most once per epoch; an acknowledged rollback was not lost);
* the store, opened in the parent (every other kill on a copy, so that the
  next child recovers the crash itself): ``verify`` clean; every success the
  ledger acknowledged in the store's epoch is there with the chain's output;
  every success in the store has the chain's output and a body that ran; the
  run's ``steps_done`` counts its successes (a step and the run's summary are
  one commit); acknowledged checkpoints exist.

Once a child completes the run, the final check: completed, every step a
success with the chain's output, the rollback happened once and what it
discarded is kept.
"""

from __future__ import annotations

import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from tests.crash.children import Child, Zygote
from tests.crash.killpoints import KillPlan
from tests.crash.seeds import CrashViolation
from tests.crash.store_lane import Tally
from tests.crash.workflow_load import (
    CHAIN_RUN,
    ROLLBACK_AT,
    ROLLBACK_TO,
    STEPS,
    STORE_OPTIONS,
    SideEffects,
    WorkflowChildConfig,
    check_side_effects,
    checkpoint_after,
    expected_outputs,
    is_idempotent,
    step_id,
)
from walsync import engine
from walsync.engine import Store
from walsync.engine.workflow import Run, RunStatus, StepStatus, Workflows

ENTRY = "tests.crash.workflow_load:drive"
CHILD_TIMEOUT_SECONDS = 60.0
#: a run not completed after this many children is stuck
MAX_CHILDREN = 600
#: a child whose kill point did not come is killed after this many step events
BACKSTOP_EVENTS = 6
FAILPOINTS = ("wal.before_write", "wal.after_write", "wal.after_sync")
#: hooks of engine seams a workflow commit goes through (any caller)
SEAM_HOOKS = ("fs.writev", "fs.fdatasync", "lmdb.apply_puts", "fs.open_segment", "fs.fsync_dir")


@dataclass(frozen=True)
class WorkflowKill:
    """How one child dies.

    ``body``: the parent's SIGKILL during the ``nth`` step body of the child;
    ``events``: after ``nth`` step events (a body started, a success
    committed) and a delay; ``time``: ``seconds`` after the fork (the open,
    the load, the settling of interrupted steps); ``point``: the child's
    own, at ``plan`` (a commit of a workflow phase, or an engine seam).
    """

    kind: str
    nth: int = 1
    seconds: float = 0.0
    plan: KillPlan | None = None

    def describe(self) -> str:
        if self.plan is not None:
            p = self.plan
            return (f"kill point {p.point} {p.when} hit {p.nth} after entry {p.entry} into "
                    f"phase {p.phase}")
        if self.kind == "time":
            return f"SIGKILL {self.seconds * 1000:.1f} ms after the fork"
        return f"SIGKILL in the child's {self.kind} #{self.nth} (+{self.seconds * 1000:.1f} ms)"


def upcoming_phase(effects: SideEffects) -> str | None:
    """The workflow phase the next child meets early, if it is a rare one."""
    epoch = effects.epoch
    pending = [i for i in range(STEPS) if (step_id(i), epoch) not in effects.acked]
    attention = [
        sid for (sid, e), _ in effects.bodies.items()
        if e == epoch and not is_idempotent(int(sid[1:])) and (sid, e) not in effects.acked
    ]
    if attention:
        return "resolve"
    if not pending:
        return None
    nxt = pending[0]
    if epoch == 0 and nxt - 1 <= ROLLBACK_AT < nxt + 2:
        return "rollback"
    if any(checkpoint_after(i) for i in range(nxt - 1, nxt + 2)):
        return "checkpoint"
    return None


def choose_kill(rng: random.Random, effects: SideEffects, body_seconds: float) -> WorkflowKill:
    rare = upcoming_phase(effects)
    r = rng.random()
    if rare is not None and r < 0.6:
        plan = KillPlan(f"failpoint.{rng.choice(FAILPOINTS)}", phase=rare)
        return WorkflowKill("point", plan=plan)
    r = rng.random()
    if r < 0.25:
        return WorkflowKill("body", nth=rng.randint(1, 2),
                            seconds=rng.uniform(0.0, body_seconds))
    if r < 0.45:
        return WorkflowKill("events", nth=rng.randint(1, 4), seconds=rng.uniform(0.0, 0.006))
    if r < 0.55:
        return WorkflowKill("time", seconds=rng.uniform(0.0, 0.025))
    if r < 0.9:
        phase = rng.choice(("start", "begin", "begin", "complete", "complete"))
        plan = KillPlan(f"failpoint.{rng.choice(FAILPOINTS)}", phase=phase,
                        entry=1 if phase == "start" else rng.randint(1, 3))
        return WorkflowKill("point", plan=plan)
    plan = KillPlan(rng.choice(SEAM_HOOKS), when=rng.choice(("before", "after")),
                    nth=rng.randint(1, 6), phase="start")
    return WorkflowKill("point", plan=plan)


class WorkflowLane:
    """Drives chained runs to completion under kills, one store per run. One thread."""

    def __init__(self, zygote: Zygote, root: Path, name: str, rng: random.Random,
                 tally: Tally, *, body_seconds: float = 0.005) -> None:
        self.zygote = zygote
        self.root = root
        self.name = name
        self.rng = rng
        self.tally = tally
        self.body_seconds = body_seconds
        self.runs = 0
        self.children = 0
        self.reruns = 0
        self.kill_points: dict[str, int] = {}
        root.mkdir(parents=True, exist_ok=True)

    def fail(self, what: str, kill: WorkflowKill | None, child: Child | None = None,
             ledger: Path | None = None) -> CrashViolation:
        how = kill.describe() if kill is not None else "final check"
        text = f"lane {self.name} run {self.runs} child {self.children} ({how}): {what}"
        if ledger is not None:
            text += f"\nside-effect ledger {ledger}"
        if child is not None:
            text += f"\nchild log {child.log_path}:\n{child.log_text()}"
        return CrashViolation(text)

    def drive_run(self) -> int:
        """Drive one fresh run to completion; return how many kills it took."""
        self.runs += 1
        base = self.root / f"run{self.runs}"
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir()
        store_path, ledger = base / "store", base / "side-effects.log"
        ledger.touch()
        kills: list[str] = []  # how each child died
        for attempt in range(MAX_CHILDREN):
            self.children += 1
            effects = check_side_effects(ledger.read_text().split("\n"))
            kill = choose_kill(self.rng, effects, self.body_seconds)
            config = WorkflowChildConfig(str(store_path), str(ledger),
                                         body_seconds=self.body_seconds,
                                         kill=kill.plan.to_dict() if kill.plan else None)
            child = self.zygote.spawn(ENTRY, config.to_dict(), base / f"child-{attempt % 4}.log")
            try:
                code, backstop = self._let_die(child, kill)
            finally:
                child.kill()
                child.close()
            effects = check_side_effects(ledger.read_text().split("\n"))
            if effects.violations:
                raise self.fail("\n  ".join(["the side-effect ledger breaks a rule:",
                                             *effects.violations[:20]]), kill, child, ledger)
            if code == 0:
                self.final_check(store_path, effects, kill, child, ledger)
                self.reruns += sum(n - 1 for n in effects.bodies.values())
                self.tally.add("completed", killed=False, acks=effects.committed)
                return len(kills)
            if code != -signal.SIGKILL:
                raise self.fail(f"the child ended with {code}", kill, child, ledger)
            killed_at = next((line for line in child.lines if line.startswith("K ")), None)
            mode = kill.kind
            if kill.plan is not None:
                if killed_at is not None:
                    mode = f"{kill.plan.phase}:{killed_at.split()[1]}"
                elif backstop:
                    mode = "backstop"
                else:
                    raise self.fail("the child died of SIGKILL before its kill point", kill,
                                    child)
            self.kill_points[mode] = self.kill_points.get(mode, 0) + 1
            self.check_store(store_path, effects, kill, child, ledger,
                             on_copy=len(kills) % 2 == 1)
            kills.append(mode)
            self.tally.add(mode.split(":")[0], killed=True, acks=0)
        raise self.fail(f"the run did not complete in {MAX_CHILDREN} children", None)

    def _let_die(self, child: Child, kill: WorkflowKill) -> tuple[int, bool]:
        """The child's exit code, and whether the backstop killed it."""
        events = [0]
        bodies = [0]

        def count() -> None:
            events[0] = sum(1 for line in child.lines if line[:1] in ("B", "C"))
            bodies[0] = sum(1 for line in child.lines if line[:1] == "B")

        def reached(limit: int, of: list[int]) -> bool:
            count()
            return of[0] >= limit

        timeout = CHILD_TIMEOUT_SECONDS
        backstop = False
        if kill.kind == "time":
            child.sleep(kill.seconds)
            child.kill()
        elif kill.kind == "body":
            if child.wait_until(lambda: reached(kill.nth, bodies), timeout):
                child.sleep(kill.seconds)
            child.kill()
        elif kill.kind == "events":
            if child.wait_until(lambda: reached(kill.nth, events), timeout):
                child.sleep(kill.seconds)
            child.kill()
        else:
            # the kill point may not come in this child: a backstop keeps runs short
            if child.wait_until(lambda: reached(BACKSTOP_EVENTS, events), timeout):
                backstop = not any(line.startswith("K ") for line in child.lines)
                child.kill()
        return child.finish(CHILD_TIMEOUT_SECONDS), backstop

    def check_store(self, store_path: Path, effects: SideEffects, kill: WorkflowKill,
                    child: Child, ledger: Path, *, on_copy: bool) -> None:
        if not (store_path / "STORE").exists():
            if effects.starts:
                raise self.fail("no STORE file after the run was loaded", kill, child, ledger)
            return
        before = engine.verify(store_path)
        if not before.ok:
            raise self.fail(f"verify found damage after a kill: {before.damage}", kill, child,
                            ledger)
        target = store_path
        if on_copy:
            target = store_path.with_name("copy")
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(store_path, target)
        try:
            store = Store.open(target, **STORE_OPTIONS)
        except engine.WalsyncError as exc:
            raise self.fail(f"the store does not open after a kill: {exc!r}", kill, child,
                            ledger) from exc
        try:
            problems = run_problems(store, effects)
        finally:
            store.close()
        if problems:
            raise self.fail("\n  ".join(["the reopened store is wrong:", *problems[:20]]),
                            kill, child, ledger)
        if on_copy:
            shutil.rmtree(target)

    def final_check(self, store_path: Path, effects: SideEffects, kill: WorkflowKill,
                    child: Child, ledger: Path) -> None:
        problems = []
        if not effects.done:
            problems.append("the child ended 0 without logging 'done'")
        if effects.epoch != 1:
            problems.append(f"the run ended in epoch {effects.epoch}, not 1 (one rollback)")
        for i in range(STEPS):
            sid = step_id(i)
            if not effects.ran(sid):
                problems.append(f"{sid} never ran")
        if not engine.verify(store_path).ok:
            problems.append("verify is not clean")
        with Store.open(store_path, **STORE_OPTIONS) as store:
            problems.extend(run_problems(store, effects))
            run = Workflows(store).get_run(CHAIN_RUN)
            if run.status != RunStatus.COMPLETED or run.record.progress != 100.0:
                problems.append(f"the run is {run.status} at {run.record.progress}%")
            if run.snapshot() != expected_outputs():
                problems.append("the run's snapshot is not the chain's outputs")
            discarded = run.discarded().get(1, {})
            redone = {step_id(i) for i in range(int(ROLLBACK_TO[1:]) + 1, ROLLBACK_AT + 1)}
            if not redone <= set(discarded):
                problems.append(f"the rollback kept {sorted(discarded)}, not {sorted(redone)}")
            names = {c.name for c in run.checkpoints()}
            wanted = {n for i in range(STEPS) if (n := checkpoint_after(i))}
            if names != wanted:
                problems.append(f"checkpoints {sorted(names)}, expected {sorted(wanted)}")
        if problems:
            raise self.fail("\n  ".join(["the completed run is wrong:", *problems[:20]]),
                            kill, child, ledger)


def run_problems(store: Store, effects: SideEffects) -> list[str]:
    """The store's run against the side-effect ledger (see the module doc)."""
    run: Run | None = Workflows(store)._load(CHAIN_RUN)
    if run is None:
        return ["the run is gone after it was loaded"] if effects.starts else []
    problems = []
    epoch = run.record.rollbacks
    if not effects.epoch <= epoch <= effects.epoch + 1:
        problems.append(f"the run is in epoch {epoch}; the ledger acknowledged epoch "
                        f"{effects.epoch}")
    expected = expected_outputs()
    successes = 0
    for sid, rec in run.steps.items():
        if rec.status != StepStatus.SUCCESS:
            continue
        successes += 1
        if run.output(sid) != expected.get(sid):
            problems.append(f"{sid} holds output {run.output(sid)!r}, not the chain's")
        if not effects.ran(sid):
            problems.append(f"{sid} is a success but its body never ran")
    for sid, e in sorted(effects.acked):
        if e != epoch:
            continue
        found = run.steps.get(sid)
        if found is None or found.status != StepStatus.SUCCESS:
            problems.append(f"the acknowledged success of {sid} in epoch {e} is lost: "
                            f"{found.status if found else 'no record'}")
    if run.record.steps_done != successes:
        problems.append(f"the run counts {run.record.steps_done} steps done, its steps "
                        f"{successes}")
    names = {c.name for c in run.checkpoints()}
    if not effects.checkpoints <= names:
        problems.append(f"acknowledged checkpoints lost: {sorted(effects.checkpoints - names)}")
    return problems
