"""One store killed over and over: a child per cycle, the ledger checked after each kill.

A :class:`StoreLane` forks a child (tests/crash/store_load.py) on its store,
kills it as a :class:`Kill` says, and then:

* ``verify`` on the crashed store finds no damage (a torn tail is allowed);
* the store opens (in the parent; every other cycle on a copy, so that the
  next child does the real recovery itself and may be killed during it);
* the ledger check holds (tests/crash/ledger.py); a torn tail never cuts an
  acknowledged LSN; ``verify`` is clean afterwards.

Any broken rule raises :class:`CrashViolation` naming the lane, cycle, kill
and the child's log. :class:`PointSweep` picks kill points so that every
point the workload reaches is killed at, before and after the call.
"""

from __future__ import annotations

import random
import shutil
import signal
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.crash.children import REPO_ROOT, Child, Zygote
from tests.crash.killpoints import WHEN, KillPlan, engine_failpoints
from tests.crash.ledger import KeyState, Ledger, Observed
from tests.crash.seeds import CrashViolation
from tests.crash.store_load import Incarnation, StoreChildConfig
from walsync import engine
from walsync.engine import Store

ENTRY = "tests.crash.store_load:child_main"
#: the failpoints of WALWriter.append, which every commit passes
WRITE_PATH_FAILPOINTS = tuple(f for f in engine_failpoints(REPO_ROOT) if f.startswith("wal."))
STORE_OPTIONS: dict[str, Any] = {"segment_bytes": 4096, "checkpoint_every_bytes": 16384}
#: a child that neither dies nor reports within this long is a hang
CHILD_TIMEOUT_SECONDS = 30.0


def read_key(store: Store, key: str) -> KeyState | str | None:
    """The key's one sibling; None if it was never written; a problem string otherwise."""
    versions = store.get_versions(key)
    if not versions:
        return None
    if len(versions) != 1:
        return f"key {key!r} has {len(versions)} siblings after local writes only"
    v = versions[0]
    return KeyState(v.version.lsn, v.value, v.version.deleted)


def observe(store: Store) -> Observed:
    return Observed(lambda key: read_key(store, key), set(store.keys()), store.next_lsn)


def check_store(store: Store, ledger: Ledger, inc: Incarnation) -> list[str]:
    """Compare a reopened store with the ledger and what one child reported; with no
    problem, the ledger advances to the store's state."""
    commits, problems = inc.commits()
    if problems:
        return problems
    return ledger.check(commits, observe(store))


@dataclass
class Tally:
    """Counts of one test or soak round; shared by lanes running in threads."""

    kills: int = 0
    missed: int = 0
    acknowledged: int = 0
    torn_tails: int = 0
    replayed_records: int = 0
    by_mode: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, mode: str, *, killed: bool, acks: int, torn: bool = False,
            replayed: int = 0) -> None:
        with self.lock:
            if killed:
                self.kills += 1
                self.by_mode[mode] += 1
            else:
                self.missed += 1
            self.acknowledged += acks
            self.torn_tails += torn
            self.replayed_records += replayed

    def summary(self) -> str:
        modes = ", ".join(f"{m} {n}" for m, n in sorted(self.by_mode.items()))
        return (f"{self.kills} kills ({modes}), {self.missed} children not killed, "
                f"{self.acknowledged} acknowledged commits, {self.torn_tails} torn tails, "
                f"{self.replayed_records} records replayed")


@dataclass(frozen=True)
class Kill:
    """How a cycle's child dies.

    ``acks``: the parent's SIGKILL after ``acks`` acknowledgements and a
    0-3 ms delay; ``early``: the parent's SIGKILL ``seconds`` after the fork
    (often in the open or replay); ``point``: the child's own, at ``plan``.
    """

    kind: str
    acks: int = 0
    seconds: float = 0.0
    plan: KillPlan | None = None

    @property
    def mode(self) -> str:
        if self.plan is None:
            return self.kind
        if self.plan.point.startswith("failpoint."):
            return self.plan.point
        return "point"

    def describe(self) -> str:
        if self.plan is not None:
            p = self.plan
            return (f"kill point {p.point} {p.when} hit {p.nth} in phase {p.phase}"
                    f" (armed after {p.after_acks} acks)")
        if self.kind == "acks":
            return f"SIGKILL after {self.acks} acknowledgements"
        return f"SIGKILL {self.seconds * 1000:.1f} ms after the fork"


def random_kill(rng: random.Random, failpoints: tuple[str, ...]) -> Kill:
    r = rng.random()
    if r < 0.70:
        return Kill("acks", acks=rng.randint(0, 60))
    if r < 0.80:
        return Kill("early", seconds=rng.uniform(0.0, 0.03))
    plan = KillPlan(f"failpoint.{rng.choice(failpoints)}", nth=rng.randint(1, 3),
                    after_acks=rng.randint(0, 40))
    return Kill("point", plan=plan)


class StoreLane:
    """One store that is killed, checked and reopened over and over. One thread."""

    def __init__(
        self, zygote: Zygote, root: Path, name: str, rng: random.Random, tally: Tally,
        *, none_fraction: float = 0.0, discover: bool = False,
    ) -> None:
        self.zygote = zygote
        self.root = root
        self.name = name
        self.path = root / "store"
        self.rng = rng
        self.tally = tally
        self.none_fraction = none_fraction
        self.discover = discover
        self.ledger = Ledger()
        self.generations = 0
        self.cycle = 0
        root.mkdir(parents=True, exist_ok=True)

    def fail(self, what: str, kill: Kill | None, child: Child | None = None) -> CrashViolation:
        how = kill.describe() if kill is not None else "final check"
        text = f"lane {self.name} cycle {self.cycle} ({how}), store {self.path}: {what}"
        if child is not None:
            text += f"\nchild log {child.log_path}:\n{child.log_text()}"
        return CrashViolation(text)

    def config(self, kill: Kill) -> StoreChildConfig:
        """The next child's workload. A child that may miss its kill point ends soon
        (after the open for a point of the open, after a few commits for one of the
        close) and compacts early, so that a miss costs little."""
        self.generations += 1
        rng = self.rng
        config = StoreChildConfig(
            path=str(self.path), seed=rng.randrange(2**31), generation=self.generations,
            segment_bytes=STORE_OPTIONS["segment_bytes"],
            checkpoint_every_bytes=STORE_OPTIONS["checkpoint_every_bytes"],
            max_acks=100_000, none_fraction=self.none_fraction,
            compact_after=rng.randint(2, 12) if rng.random() < 0.5 else -1,
            kill=kill.plan.to_dict() if kill.plan is not None else None,
            discover=self.discover,
        )
        if kill.plan is not None:
            config.max_acks = kill.plan.after_acks + rng.randint(30, 60)
            config.compact_after = rng.randint(1, 5)
            config.checkpoint_fraction = 0.05
            if kill.plan.phase == "open":
                config.open_only = True
            elif kill.plan.phase == "close":
                config.max_acks = rng.randint(5, 20)
        return config

    def run_child(self, kill: Kill, config: StoreChildConfig | None = None) -> Incarnation:
        """Start a child, let it die per ``kill``, check the store. Returns its report."""
        self.cycle += 1
        config = config or self.config(kill)
        inc = Incarnation(config.generation)
        child = self.zygote.spawn(ENTRY, config.to_dict(),
                                  self.root / f"child-{self.cycle % 4}.log", inc.feed)
        try:
            if kill.kind == "acks":
                if not child.wait_until(lambda: inc.ready and len(inc.acks) >= kill.acks,
                                        CHILD_TIMEOUT_SECONDS):
                    raise self.fail(f"the child did not reach {kill.acks} acknowledgements",
                                    kill, child)
                child.sleep(self.rng.uniform(0, 0.003))
                child.kill()
            elif kill.kind == "early":
                child.sleep(kill.seconds)
                child.kill()
            code = child.finish(CHILD_TIMEOUT_SECONDS)
        finally:
            child.kill()
            child.close()
        killed = code == -signal.SIGKILL
        if kill.kind == "point":
            if killed and inc.killed_at is None:
                raise self.fail("the child died of SIGKILL before its kill point", kill, child)
            if not killed and code != 0:
                raise self.fail(f"the child ended with {code}", kill, child)
        elif not killed:
            raise self.fail(f"the child ended with {code}, not by SIGKILL", kill, child)
        torn, replayed = self.check(inc, kill, child)
        self.tally.add(kill.mode, killed=killed, acks=len(inc.acks), torn=torn,
                       replayed=replayed)
        return inc

    def check(self, inc: Incarnation, kill: Kill, child: Child) -> tuple[bool, int]:
        if not (self.path / "STORE").exists():
            # Killed before the store existed: legitimate only if nothing was acknowledged.
            if inc.acks:
                raise self.fail("no STORE file after acknowledged commits", kill, child)
        else:
            before = engine.verify(self.path)
            if not before.ok:
                raise self.fail(f"verify found damage after a process kill: {before.damage}",
                                kill, child)
        # Every other cycle the parent recovers a copy and leaves the real
        # recovery of the crashed store to the next child.
        on_copy = self.cycle % 2 == 0
        target = self.path
        if on_copy:
            target = self.root / "copy"
            shutil.rmtree(target, ignore_errors=True)
            if self.path.exists():
                shutil.copytree(self.path, target)
        max_acked = max(inc.acks.values(), default=0)
        try:
            store = Store.open(target, **STORE_OPTIONS)
        except engine.WalsyncError as exc:
            raise self.fail(f"the store does not open after a kill: {exc!r}", kill,
                            child) from exc
        try:
            report = store.recovery
            assert report is not None
            torn = report.torn_tail
            if torn is not None and torn.first_lost_lsn <= max_acked:
                raise self.fail(f"the torn tail {torn} cuts acknowledged LSN {max_acked}",
                                kill, child)
            problems = check_store(store, self.ledger, inc)
            if problems:
                raise self.fail("\n  ".join(["the reopened store is wrong:", *problems[:20]]),
                                kill, child)
        finally:
            store.close()
        after = engine.verify(target)
        if not after.ok or after.torn_tail is not None:
            raise self.fail(f"verify after reopening: damage {after.damage}, torn tail "
                            f"{after.torn_tail}", kill, child)
        if on_copy:
            shutil.rmtree(target)
        return torn is not None, report.replayed_records

    def final_check(self) -> None:
        """The parent opens the real store once more: the ledger's state, verify clean."""
        with Store.open(self.path, **STORE_OPTIONS) as store:
            for key, want in self.ledger.known.items():
                got = read_key(store, key)
                if got != want:
                    raise self.fail(f"final check: key {key!r} holds {got}, expected {want}",
                                    None)
        report = engine.verify(self.path)
        if not report.ok:
            raise self.fail(f"final verify: {report.damage}", None)


def misses_allowed(phase: str, frequency: float) -> int:
    """After this many misses in a row a kill point is not sought any more: more for
    points most children reach, and for points of the open (a miss there is cheap)."""
    return 6 if phase == "open" else 3 if frequency >= 0.3 else 2


@dataclass
class PointSweep:
    """Every (point, phase) the workload reached, and the kills made at each.

    ``next_plan`` picks the least-killed (point, phase, when), the points
    reached by most children first, so a sweep long enough kills at every
    point before and after the call. A point only some children reach (one
    that needs a particular crash before it, say) may miss; after a few
    misses in a row (``misses_allowed``) it is not sought any more.
    """

    #: (point, phase) -> the most hits one child reported
    reached: dict[tuple[str, str], int] = field(default_factory=dict)
    #: (point, phase) -> how many children reached it
    children_reaching: Counter[tuple[str, str]] = field(default_factory=Counter)
    children: int = 0
    kills: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    misses: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    def learn(self, inc: Incarnation) -> None:
        self.children += 1
        for key in inc.reached:
            self.reached.setdefault(key, 1)
            self.children_reaching[key] += 1
        for key, count in inc.counts.items():
            self.reached[key] = max(self.reached.get(key, 1), count)

    def frequency(self, point: str, phase: str) -> float:
        return self.children_reaching[(point, phase)] / max(1, self.children)

    def combos(self) -> list[tuple[str, str, str]]:
        return sorted(
            (point, phase, when)
            for point, phase in self.reached
            for when in WHEN
            if not (point.startswith("failpoint.") and when == "after")
        )

    def open_combos(self) -> list[tuple[str, str, str]]:
        return [c for c in self.combos()
                if self.misses[c] < misses_allowed(c[1], self.frequency(c[0], c[1]))]

    def next_plan(self, rng: random.Random) -> KillPlan | None:
        combos = self.open_combos()
        if not combos:
            return None
        rank = min((self.kills[c], -self.frequency(c[0], c[1])) for c in combos)
        point, phase, when = rng.choice(
            [c for c in combos if (self.kills[c], -self.frequency(c[0], c[1])) == rank])
        hits = self.reached[(point, phase)]
        return KillPlan(point, when, nth=rng.randint(1, max(1, min(hits, 4))), phase=phase,
                        after_acks=rng.randint(0, 8) if phase == "run" else 0)

    def record(self, plan: KillPlan, inc: Incarnation) -> None:
        combo = (plan.point, plan.phase, plan.when)
        if inc.killed_at is not None:
            self.kills[combo] += 1
            self.misses[combo] = 0
        else:
            self.misses[combo] += 1

    def unkilled(self, min_frequency: float) -> list[tuple[str, str, str]]:
        """Combos of points at least that share of children reach, never killed at."""
        return [c for c in self.combos()
                if not self.kills[c] and self.frequency(c[0], c[1]) >= min_frequency]

    def table(self) -> str:
        return "\n".join(
            f"  {self.kills[c]:3d} kills {c[0]} [{c[1]}, {c[2]}] reached by "
            f"{self.frequency(c[0], c[1]):.0%} of children"
            + (f", {self.misses[c]} misses" if self.misses[c] else "")
            for c in self.combos())
