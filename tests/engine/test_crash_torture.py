"""Crash torture: SIGKILL a committing child process again and again, check what survived.

Each store lives through many kills: a child (tests/engine/_crashkit.py) opens
it, replays whatever the previous child left, commits from four threads
(single puts, deletes, multi-key batches, durability 'local', small segments
so that rotation and background checkpoints run too) and reports every intent
and acknowledgement on a pipe; the parent SIGKILLs it at a seeded random
moment, or a named failpoint (``wal.before_write``, ``wal.after_write``,
``wal.after_sync``) kills it, and then:

* ``verify`` on the crashed store finds no damage (a torn tail is allowed);
* the store opens (in the parent; every other cycle on a copy, so that the
  next child does the real recovery itself and may be killed during it);
* every acknowledged commit is there unless a later write of its key replaced
  it, each in-flight commit is wholly there or wholly absent, nothing else is;
* a torn tail never cuts an acknowledged LSN; ``verify`` is ok afterwards.

The seed comes from WALSYNC_CRASH_SEED (random when unset); every failure
prints it with the command that replays it.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

import engine
from engine import Store
from tests.engine._crashkit import (
    ChildConfig,
    ChildRun,
    Incarnation,
    KeyState,
    Ledger,
    batch_key,
    check_store,
    crash_seed,
    make_value,
    replay_command,
    single_key,
)

pytestmark = pytest.mark.crash

SEED = crash_seed()
THIS_FILE = "tests/engine/test_crash_torture.py"
FAILPOINTS = ("wal.before_write", "wal.after_write", "wal.after_sync")
STORE_OPTIONS: dict[str, Any] = {"segment_bytes": 4096, "checkpoint_every_bytes": 16384}
#: a child that neither dies nor reports within this long is a hang
CHILD_TIMEOUT_SECONDS = 30.0


@contextlib.contextmanager
def _seeded(test_name: str) -> Iterator[None]:
    """Any error or failed assert in the block fails the test naming the seed and the
    command that replays it."""
    try:
        yield
    except Exception:  # noqa: BLE001 - re-raised as a test failure that names the seed
        pytest.fail(
            f"{replay_command(SEED, THIS_FILE, test_name)}\n{traceback.format_exc()}",
            pytrace=False,
        )


@dataclass
class CrashStats:
    kills: int = 0
    by_mode: dict[str, int] = field(default_factory=dict)
    acknowledged: int = 0
    torn_tails: int = 0
    replayed_records: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, mode: str, acks: int, torn: bool, replayed: int) -> None:
        with self.lock:
            self.kills += 1
            self.by_mode[mode] = self.by_mode.get(mode, 0) + 1
            self.acknowledged += acks
            self.torn_tails += torn
            self.replayed_records += replayed


class Lane:
    """One store that is killed, checked and reopened over and over."""

    def __init__(
        self, root: Path, name: str, rng: random.Random, test_name: str,
        none_fraction: float = 0.0,
    ) -> None:
        self.none_fraction = none_fraction
        self.root = root
        self.name = name
        self.path = root / "store"
        self.rng = rng
        self.ledger = Ledger()
        self.test_name = test_name
        self.cycle = 0

    def fail(self, what: str, mode: str, run: ChildRun | None = None) -> NoReturn:
        where = f"lane {self.name} cycle {self.cycle} mode {mode}, store {self.path}"
        child = ""
        if run is not None:
            child = f"\nchild config: {run.config.to_json()}\nchild stderr:\n{run.stderr_text()}"
        pytest.fail(
            f"{replay_command(SEED, THIS_FILE, self.test_name)}\n{where}: {what}{child}",
            pytrace=False,
        )

    def cycle_once(self, mode: str, stats: CrashStats) -> None:
        """Start a child, kill it per ``mode``, check the store. ``mode``:

        ``acks``: SIGKILL after a random number of acknowledgements (0-60) and a
        random delay of 0-3 ms; ``early``: SIGKILL at a random
        time from 30 ms to 150 ms after the start (often during import, open
        or replay); ``env:<failpoint>``: WALSYNC_FAILPOINTS kills the child at
        its first write; ``armed:<failpoint>``: the child switches the
        failpoint on after a random number of acknowledgements.
        """
        self.cycle += 1
        rng = self.rng
        generation = self.ledger.new_generation()
        config = ChildConfig(
            path=str(self.path), seed=rng.randrange(2**31), generation=generation, threads=4,
            segment_bytes=STORE_OPTIONS["segment_bytes"],
            checkpoint_every_bytes=STORE_OPTIONS["checkpoint_every_bytes"],
            none_fraction=self.none_fraction,
        )
        env_failpoints = None
        kind, _, point = mode.partition(":")
        if kind == "env":
            env_failpoints = f"{point}=kill"
        elif kind == "armed":
            config.arm_failpoint = point
            config.arm_after_acks = rng.randint(1, 40)
        run = ChildRun(
            config, env_failpoints=env_failpoints,
            stderr_path=self.root / f"child-{self.cycle}.stderr",
        )
        try:
            if kind == "acks":
                wanted = rng.randint(0, 60)
                if not run.wait_for(wanted, CHILD_TIMEOUT_SECONDS):
                    run.kill()
                    run.finish()
                    self.fail(f"the child did not reach {wanted} acknowledgements", mode, run)
                time.sleep(rng.uniform(0, 0.003))
                run.kill()
            elif kind == "early":
                time.sleep(rng.uniform(0.03, 0.15))
                run.kill()
            code = run.finish(CHILD_TIMEOUT_SECONDS)
        finally:
            run.kill()
        if code != -signal.SIGKILL:
            self.fail(f"the child ended with {code}, not by SIGKILL", mode, run)
        inc = run.incarnation
        self.check(inc, mode, run, stats)

    def check(self, inc: Incarnation, mode: str, run: ChildRun, stats: CrashStats) -> None:
        if not (self.path / "STORE").exists():
            # Killed before the store existed: legitimate only if nothing was acknowledged.
            if inc.acks:
                self.fail("no STORE file after acknowledged commits", mode, run)
        else:
            before = engine.verify(self.path)
            if not before.ok:
                self.fail(f"verify found damage after a process kill: {before.damage}", mode,
                          run)
        # Every other cycle the parent recovers a copy and leaves the real
        # recovery of the crashed store to the next child.
        on_copy = self.cycle % 2 == 0
        target = self.path
        if on_copy:
            target = self.root / "copy"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(self.path, target)
        max_acked = max(inc.acks.values(), default=0)
        try:
            store = Store.open(target, **STORE_OPTIONS)
        except engine.WalsyncError as exc:
            self.fail(f"the store does not open after a kill: {exc!r}", mode, run)
        try:
            report = store.recovery
            assert report is not None
            torn = report.torn_tail
            if torn is not None and torn.first_lost_lsn <= max_acked:
                self.fail(f"the torn tail {torn} cuts acknowledged LSN {max_acked}", mode, run)
            problems = check_store(store, self.ledger, inc)
            if problems:
                self.fail("\n  ".join(["the reopened store is wrong:", *problems[:20]]), mode,
                          run)
        finally:
            store.close()
        after = engine.verify(target)
        if not after.ok or after.torn_tail is not None:
            self.fail(f"verify after reopening: damage {after.damage}, torn tail "
                      f"{after.torn_tail}", mode, run)
        if on_copy:
            shutil.rmtree(target)
        stats.add(mode, len(inc.acks), torn is not None, report.replayed_records)


def _pick_mode(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.70:
        return "acks"
    if r < 0.80:
        return "early"
    return f"armed:{rng.choice(FAILPOINTS)}"


def _final_check(lane: Lane) -> None:
    """The parent opens the real store once more: the ledger's state, verify ok."""
    with Store.open(lane.path, **STORE_OPTIONS) as store:
        for key, want in lane.ledger.known.items():
            versions = store.get_versions(key)
            got = KeyState(versions[0].version.lsn, versions[0].value,
                           versions[0].version.deleted) if versions else None
            if got != want:
                lane.fail(f"final check: key {key!r} holds {got}, expected {want}", "final")
    report = engine.verify(lane.path)
    if not report.ok:
        lane.fail(f"final verify: {report.damage}", "final")


def test_crash_torture_random_kills_keep_every_acknowledged_commit(tmp_path: Path) -> None:
    """Two stores side by side (two cores), 100 kills each at random moments.

    Lane 0 commits with durability 'local' only; lane 1 makes a third of its
    commits with 'none', which a process crash must keep as well.
    """
    name = "test_crash_torture_random_kills_keep_every_acknowledged_commit"
    cycles = 100
    stats = CrashStats()
    lanes = []
    for i in range(2):
        root = tmp_path / f"lane{i}"
        root.mkdir()
        lanes.append(Lane(root, str(i), random.Random(f"{SEED}/{name}/{i}"), name,
                          none_fraction=0.3 * i))

    def drive(lane: Lane) -> None:
        with _seeded(name):
            for _ in range(cycles):
                lane.cycle_once(_pick_mode(lane.rng), stats)
            _final_check(lane)

    started = time.monotonic()
    with ThreadPoolExecutor(len(lanes)) as pool:
        for future in [pool.submit(drive, lane) for lane in lanes]:
            future.result()
    print(f"\ncrash torture seed {SEED}: {stats.kills} kills {stats.by_mode}, "
          f"{stats.acknowledged} acknowledged commits, {stats.torn_tails} torn tails, "
          f"{stats.replayed_records} records replayed, {time.monotonic() - started:.1f} s")
    assert stats.kills == 2 * cycles
    assert stats.acknowledged > 1000, "the children barely committed: the test lost its teeth"
    for lane in lanes:
        assert lane.ledger.known, f"lane {lane.name} never wrote a key"


@pytest.mark.parametrize("failpoint", FAILPOINTS)
def test_crash_torture_failpoint_kills_lose_no_acknowledged_commit(
    tmp_path: Path, failpoint: str
) -> None:
    """A kill exactly at each named point of the write path, first write and later ones."""
    name = f"test_crash_torture_failpoint_kills_lose_no_acknowledged_commit and {failpoint}"
    lane = Lane(tmp_path, failpoint, random.Random(f"{SEED}/{failpoint}"), f"'{name}'")
    stats = CrashStats()
    with _seeded(lane.test_name):
        for i in range(10):
            lane.cycle_once(f"env:{failpoint}" if i % 3 == 0 else f"armed:{failpoint}", stats)
        _final_check(lane)
    assert stats.kills == 10
    assert stats.acknowledged > 0


def test_crash_checker_reports_lost_ack_and_half_applied_batch(tmp_path: Path) -> None:
    """The checker is not vacuous: it flags a missing acknowledged write and a half batch."""
    gen = 1
    with Store.open(tmp_path / "s") as store:
        full = store.put(single_key(0, 0), make_value(0, 0, gen, 3)).lsn
        # a "batch" of thread 1 of which only one key made it
        half = store.put(batch_key(1, 0), make_value(1, 0, gen, 0)).lsn
        inc = Incarnation(gen)
        for line in [
            "R 1 1",
            "I 0 0 " + json.dumps([["put", single_key(0, 0), 3]]),
            f"A 0 0 {full}",
            "I 0 1 " + json.dumps([["put", single_key(0, 1), 5]]),
            f"A 0 1 {full + 100}",  # acknowledged, but not in the store
            "I 1 0 " + json.dumps([["put", batch_key(1, 0), 0], ["put", batch_key(1, 1), 0]]),
        ]:
            inc.feed(line)
        problems = check_store(store, Ledger(), inc)
    text = "\n".join(problems)
    assert half > full
    assert f"key {single_key(0, 1)!r}: expected the acknowledged write" in text
    assert "half-applied commit (thread 1 seq 0" in text


def test_crash_checker_accepts_consistent_store_and_advances_ledger(tmp_path: Path) -> None:
    gen = 1
    ledger = Ledger()
    with Store.open(tmp_path / "s") as store:
        first = store.put(single_key(0, 0), make_value(0, 0, gen, 1)).lsn
        second = store.delete(single_key(0, 0)).lsn
        with store.batch() as b:  # thread 1's in-flight batch, wholly applied
            b.put(batch_key(1, 0), make_value(1, 0, gen, 2))
            b.delete(batch_key(1, 1))
        inc = Incarnation(gen)
        for line in [
            "I 0 0 " + json.dumps([["put", single_key(0, 0), 1]]),
            f"A 0 0 {first}",
            "I 0 1 " + json.dumps([["del", single_key(0, 0), None]]),
            f"A 0 1 {second}",
            "I 1 0 " + json.dumps([["put", batch_key(1, 0), 2], ["del", batch_key(1, 1), None]]),
        ]:
            inc.feed(line)
        assert check_store(store, ledger, inc) == []
    assert ledger.known[single_key(0, 0)] == KeyState(second, None, True)
    assert ledger.known[batch_key(1, 1)].deleted
    assert ledger.max_lsn == second + 1
    assert ledger.acknowledged == 2



REPLAY_RECORDS = 2000
REPLAY_KILLS = 24


def _build_replay_store(path: Path, records: int) -> dict[str, Any]:
    """A store whose whole WAL (many small segments) must be replayed on open: built,
    closed with its segments kept, then its snapshot removed. Returns its state."""
    with Store.open(path, segment_bytes=4096, durability="none") as store:
        store.set_retain_floor(1)
        for i in range(records):
            if i % 10 == 9:
                with store.batch() as b:
                    for j in range(3):
                        b.put(f"batch/{j}", {"i": i, "j": j})
            elif i % 7 == 6:
                store.delete(f"key/{(i - 1) % 50}")
            else:
                store.put(f"key/{i % 50}", {"i": i, "pad": "r" * (i % 40)})
        state = dict(store.scan())
    shutil.rmtree(path / "snapshot")
    return state


def test_crash_torture_kill_during_replay_gives_the_same_state(tmp_path: Path) -> None:
    """SPEC 2.4: a crash during replay and a second open give the same state. Children
    open a store that must replay ~75 segments and are killed at random moments of the
    replay, twice per round; then the parent opens it and finds exactly the state the
    WAL holds."""
    name = "test_crash_torture_kill_during_replay_gives_the_same_state"
    with _seeded(name):
        _kill_during_replay(tmp_path, name)


def _kill_during_replay(tmp_path: Path, name: str) -> None:
    rng = random.Random(f"{SEED}/{name}")
    pristine = tmp_path / "pristine"
    expected = _build_replay_store(pristine, REPLAY_RECORDS)
    segments = len(list((pristine / "wal").iterdir()))
    assert segments >= 40
    # calibrate: how long a child's open (the whole replay) takes, as the parent sees it
    probe = tmp_path / "probe"
    shutil.copytree(pristine, probe)
    config = ChildConfig(path=str(probe), seed=0, generation=0, open_only=True)
    run = ChildRun(config, stderr_path=tmp_path / "probe.stderr")
    assert run.wait_opening(CHILD_TIMEOUT_SECONDS)
    opening = time.monotonic()
    assert run.wait_for(0, CHILD_TIMEOUT_SECONDS), run.stderr_text()
    open_seconds = time.monotonic() - opening
    assert run.finish(CHILD_TIMEOUT_SECONDS) == 0
    shutil.rmtree(probe)

    lane = Lane(tmp_path, "replay", rng, name)
    kills = during_open = 0
    for round_ in range(2 * REPLAY_KILLS):
        if kills >= REPLAY_KILLS:
            break
        store_path = tmp_path / f"round{round_}"
        shutil.copytree(pristine, store_path)
        lane.path = store_path
        for k in range(2):
            lane.cycle = round_ * 2 + k
            config = ChildConfig(path=str(store_path), seed=0, generation=0, open_only=True,
                                 segment_bytes=4096)
            run = ChildRun(config, stderr_path=tmp_path / f"replay-{round_}-{k}.stderr")
            try:
                if not run.wait_opening(CHILD_TIMEOUT_SECONDS):
                    lane.fail("the child never got to opening the store", "replay", run)
                time.sleep(rng.uniform(0, 1.1 * open_seconds))
                run.kill()
                code = run.finish(CHILD_TIMEOUT_SECONDS)
            finally:
                run.kill()
            if code == -signal.SIGKILL:
                kills += 1
                during_open += not run.incarnation.ready
            elif code != 0:
                lane.fail(f"the replaying child ended with {code}", "replay", run)
            verify = engine.verify(store_path)
            if not verify.ok:
                lane.fail(f"verify after a kill during replay: {verify.damage}", "replay", run)
        with Store.open(store_path) as store:
            got = dict(store.scan())
            if got != expected:
                missing = sorted(set(expected) - set(got))[:5]
                wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])[:5]
                lane.fail(f"state after replays killed midway differs: missing {missing}, "
                          f"different {wrong}, extra {sorted(set(got) - set(expected))[:5]}",
                          "replay")
            assert store.applied_lsn == REPLAY_RECORDS
            assert store.next_lsn == REPLAY_RECORDS + 1
        after = engine.verify(store_path)
        if not after.ok:
            lane.fail(f"verify after the final open: {after.damage}", "replay")
        shutil.rmtree(store_path)
    print(f"\nreplay kills seed {SEED}: {kills} kills, {during_open} inside the open "
          f"(replaying {segments} segments takes {open_seconds * 1000:.0f} ms)")
    hint = replay_command(SEED, THIS_FILE, name)
    assert kills >= REPLAY_KILLS, f"only {kills} children were killed ({hint})"
    assert during_open >= REPLAY_KILLS // 4, (
        f"only {during_open} kills landed inside an open ({hint})"
    )
