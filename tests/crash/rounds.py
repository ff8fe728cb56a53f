"""Soak rounds: one bounded piece of crash or fault torture each, with its counts.

A round is ``Round = Callable[[random.Random, Path], RoundResult]``: it draws
every choice from the generator, works under the (empty, existing)
directory, and reports what it did. It never raises for a broken guarantee:
it lists it in ``violations`` (a round that cannot run at all may raise).
``python -m tests.soak`` (tests/soak.py) runs the registered rounds in turn
for a chosen duration; the crash rounds here need a fork server, bound with
``functools.partial``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.crash.children import Zygote
from tests.crash.seeds import CrashViolation
from tests.crash.store_lane import (
    WRITE_PATH_FAILPOINTS,
    Kill,
    PointSweep,
    StoreLane,
    Tally,
    random_kill,
)
from tests.crash.workflow_lane import WorkflowLane

#: children per engine round (one store, killed this many times or so)
STORE_ROUND_CHILDREN = 40


@dataclass
class RoundResult:
    name: str
    kills: int = 0
    acknowledged: int = 0
    faults: int = 0
    violations: list[str] = field(default_factory=list)


Round = Callable[[random.Random, Path], RoundResult]


def store_round(zygote: Zygote, rng: random.Random, workdir: Path) -> RoundResult:
    """One store killed ~40 times: at random moments, at write-path failpoints, and at
    kill points of the engine's seams found as the round goes."""
    tally = Tally()
    lane = StoreLane(zygote, workdir, "soak", rng, tally,
                     none_fraction=rng.choice((0.0, 0.3)), discover=True)
    sweep = PointSweep()
    violations = []
    try:
        for _ in range(STORE_ROUND_CHILDREN):
            plan = sweep.next_plan(rng) if rng.random() < 0.4 else None
            kill = Kill("point", plan=plan) if plan else random_kill(rng, WRITE_PATH_FAILPOINTS)
            inc = lane.run_child(kill)
            sweep.learn(inc)
            if plan is not None:
                sweep.record(plan, inc)
        lane.final_check()
    except CrashViolation as exc:
        violations.append(str(exc))
    return RoundResult("engine", tally.kills, tally.acknowledged, 0, violations)


def workflow_round(zygote: Zygote, rng: random.Random, workdir: Path) -> RoundResult:
    """One chained run with checkpoints and a rollback driven to completion under kills."""
    tally = Tally()
    lane = WorkflowLane(zygote, workdir, "soak", rng, tally)
    violations = []
    try:
        lane.drive_run()
    except CrashViolation as exc:
        violations.append(str(exc))
    return RoundResult("workflow", tally.kills, tally.acknowledged, 0, violations)
