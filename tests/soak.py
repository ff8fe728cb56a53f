"""Soak: crash (and fault) torture rounds for a chosen duration, with counts.

    .venv/bin/python -m tests.soak --minutes 30 [--seed S] [--only engine,workflow,network]
    .venv/bin/python -m tests.soak --replay engine:1234567   # one round again

Not part of the unit suite (CI runs the bounded crash tests instead). Runs the
registered rounds (tests/crash/rounds.py) in turn until the time is up; every
minute and at the end it prints the kills, commits acknowledged, faults
injected and violations found, with the seed. Each round draws from its own
seed, printed with any violation together with the ``--replay`` command that
runs that round alone; a failed round's directory is kept. Exits 1 if any
round found a violation.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.crash.children import Zygote
from tests.crash.rounds import Round, RoundResult, store_round, workflow_round
from tests.pg import PostgresCluster
from tests.sync.netfaults import soak_round


class _Cluster(PostgresCluster):
    """Started by the first network round, removed when the soak ends."""

    def close(self) -> None:
        self.cleanup()


def registry(zygote: Zygote, cluster: PostgresCluster) -> list[tuple[str, Round]]:
    """The rounds a soak runs in turn; a round of another suite is one more line here."""
    return [
        ("engine", functools.partial(store_round, zygote)),
        ("workflow", functools.partial(workflow_round, zygote)),
        ("network", functools.partial(network_round, cluster)),
    ]


def network_round(cluster: PostgresCluster, rng: random.Random, workdir: Path) -> RoundResult:
    """Sync network faults (tests/sync/netfaults.py) against a throwaway cluster that
    the soak starts on the first such round; rounds share one database."""
    if not cluster.running:
        cluster.start()
    return soak_round(cluster, cluster.dsn(), rng, workdir)


@dataclass
class Totals:
    seed: int
    rounds: int = 0
    kills: int = 0
    acknowledged: int = 0
    faults: int = 0
    violations: list[str] = field(default_factory=list)
    by_round: dict[str, int] = field(default_factory=dict)

    def add(self, result: RoundResult) -> None:
        self.rounds += 1
        self.by_round[result.name] = self.by_round.get(result.name, 0) + 1
        self.kills += result.kills
        self.acknowledged += result.acknowledged
        self.faults += result.faults
        self.violations.extend(result.violations)

    def line(self, elapsed_seconds: float) -> str:
        rounds = ", ".join(f"{n} {name}" for name, n in sorted(self.by_round.items()))
        return (f"soak seed {self.seed}, {elapsed_seconds / 60:.1f} min: {self.rounds} rounds "
                f"({rounds}), {self.kills} kills, {self.acknowledged} commits acknowledged, "
                f"{self.faults} faults injected, {len(self.violations)} violations")


def run_one(name: str, round_: Round, round_seed: int, root: Path, totals: Totals) -> bool:
    """Run one round in a fresh directory under ``root``; keep the directory if it failed."""
    workdir = root / f"{totals.rounds:05d}-{name}-{round_seed}"
    workdir.mkdir()
    result = round_(random.Random(round_seed), workdir)
    totals.add(result)
    for violation in result.violations:
        print(f"VIOLATION in round {name} (seed {round_seed}; replay: .venv/bin/python -m "
              f"tests.soak --replay {name}:{round_seed}); kept {workdir}\n{violation}",
              flush=True)
    if result.violations:
        return False
    shutil.rmtree(workdir, ignore_errors=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run")
    parser.add_argument("--seed", type=int, help="the seed of the rounds' seeds")
    parser.add_argument("--only", help="comma-separated round names")
    parser.add_argument("--replay", metavar="NAME:SEED", help="run one round with its seed")
    parser.add_argument("--workdir", type=Path, help="where rounds run (default: a temp dir)")
    args = parser.parse_args(argv)
    # the faults are injected on purpose: the store's and replicator's warnings about
    # them (retries, torn tails cut) would bury the counts; errors still show
    logging.getLogger("walsync").setLevel(logging.ERROR)
    replay_name, _, replay_seed = (args.replay or "").partition(":")
    if args.replay and not replay_seed.isdigit():
        parser.error("--replay takes NAME:SEED")
    seed = int(replay_seed) if args.replay else args.seed
    if seed is None:
        seed = random.SystemRandom().randrange(1, 2**31)
    root = Path(tempfile.mkdtemp(prefix="walsync-soak-", dir=args.workdir))
    totals = Totals(seed)
    started = time.monotonic()
    try:
        with Zygote(root / "zygote") as zygote, contextlib.closing(_Cluster()) as cluster:
            rounds = registry(zygote, cluster)
            names = [name for name, _ in rounds]
            wanted = {replay_name} if args.replay else set(
                args.only.split(",") if args.only else names)
            if not wanted <= set(names):
                parser.error(f"unknown rounds {sorted(wanted - set(names))} "
                             f"(rounds: {', '.join(names)})")
            rounds = [(name, r) for name, r in rounds if name in wanted]
            if args.replay:
                print(f"replaying round {replay_name} with seed {seed}", flush=True)
                run_one(replay_name, rounds[0][1], seed, root, totals)
            else:
                soak(rounds, args.minutes, root, totals, started)
    finally:
        print(totals.line(time.monotonic() - started), flush=True)
        if not totals.violations:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if totals.violations else 0


def soak(rounds: list[tuple[str, Round]], minutes: float, root: Path, totals: Totals,
         started: float) -> None:
    """The rounds in turn, each with a seed drawn from the soak's, until time is up."""
    master = random.Random(totals.seed)
    deadline = started + minutes * 60
    next_report = started + 60
    print(f"soak seed {totals.seed}: rounds {', '.join(n for n, _ in rounds)} for "
          f"{minutes} min under {root}", flush=True)
    while time.monotonic() < deadline:
        for name, round_ in rounds:
            run_one(name, round_, master.randrange(1, 2**31), root, totals)
            if time.monotonic() >= next_report:
                print(totals.line(time.monotonic() - started), flush=True)
                next_report += 60
            if time.monotonic() >= deadline:
                return


if __name__ == "__main__":
    sys.exit(main())
