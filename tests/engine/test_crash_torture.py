"""Crash torture: SIGKILL a committing child process again and again, check what survived.

Children are forked by the crash harness's fork server (tests/crash/): each
opens a store, replays whatever the previous child left, commits from four
threads (single puts, deletes, multi-key batches; small segments so rotation,
background checkpoints and segment removal run; now and then a compaction)
and reports every intent and acknowledgement; it dies by the parent's
SIGKILL at a seeded moment, or by its own at a kill point: a named failpoint,
or any call into the engine's file layer or LMDB seam, before or after it.
After each kill the store must verify, open, and match the acknowledgement
ledger (tests/crash/store_lane.py has the rules).

The seed comes from WALSYNC_CRASH_SEED (random when unset); every failure
prints it with the command that replays it. The kill counts are written to
the terminal at the end of the module.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.crash.children import REPO_ROOT, Zygote
from tests.crash.killpoints import KillPlan, engine_failpoints
from tests.crash.ledger import KeyState, Ledger
from tests.crash.seeds import CrashViolation, crash_seed, seeded
from tests.crash.store_lane import (
    CHILD_TIMEOUT_SECONDS,
    WRITE_PATH_FAILPOINTS,
    Kill,
    PointSweep,
    StoreLane,
    Tally,
    check_store,
    random_kill,
)
from tests.crash.store_load import Incarnation, StoreChildConfig, batch_key, make_value, single_key
from tests.crash.summary import KillSummary
from walsync import engine
from walsync.engine import Store

pytestmark = pytest.mark.crash

SEED = crash_seed()


FAILPOINTS = engine_failpoints(REPO_ROOT)

RANDOM_LANES = 2
RANDOM_KILLS_PER_LANE = 220
SWEEP_LANES = 2
SWEEP_KILL_FLOOR = 200
#: every (point, phase, when) reached by at least this share of children is killed at
SWEEP_MIN_FREQUENCY = 0.5
SWEEP_MAX_CYCLES = 600
FAILPOINT_KILLS = 30
REPLAY_RECORDS = 2000
REPLAY_ROUNDS = 30


def _in_parallel(*jobs: Any) -> None:
    """Run the callables on their own threads (two cores: two lanes); re-raise the first
    error."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


def test_crash_torture_random_kills_keep_every_acknowledged_commit(
    zygote: Zygote, tmp_path: Path, request: pytest.FixtureRequest, kill_summary: KillSummary,
) -> None:
    """Two stores side by side, killed at random moments: after a random number of
    acknowledgements, at a random time from the fork (often in the open), or at a
    failpoint armed after some commits.

    Lane 0 commits with durability 'local' only; lane 1 makes a third of its
    commits with 'none', which a process crash must keep as well.
    """
    with seeded(SEED, request.node.nodeid):
        tally = Tally()
        lanes = [
            StoreLane(zygote, tmp_path / f"lane{i}", str(i),
                      random.Random(f"{SEED}/random/{i}"), tally, none_fraction=0.3 * i)
            for i in range(RANDOM_LANES)
        ]

        def drive(lane: StoreLane) -> None:
            kills = 0
            while kills < RANDOM_KILLS_PER_LANE:
                if lane.cycle > 2 * RANDOM_KILLS_PER_LANE:
                    raise CrashViolation(f"lane {lane.name}: only {kills} kills in "
                                         f"{lane.cycle} children")
                kill = random_kill(lane.rng, WRITE_PATH_FAILPOINTS)
                inc = lane.run_child(kill)
                kills += kill.plan is None or inc.killed_at is not None
            lane.final_check()

        started = time.monotonic()
        _in_parallel(*(lambda lane=lane: drive(lane) for lane in lanes))
        floor = RANDOM_LANES * RANDOM_KILLS_PER_LANE
        kill_summary.add("random kills", tally.kills, floor, tally.summary())
        print(f"\nrandom kills, seed {SEED}: {tally.summary()}, "
              f"{time.monotonic() - started:.1f} s")
        assert tally.kills >= floor
        assert tally.acknowledged > 5000, "the children barely committed: no teeth"
        for lane in lanes:
            assert lane.ledger.known, f"lane {lane.name} never wrote a key"


def test_crash_torture_kill_point_sweep_kills_at_every_engine_seam(
    zygote: Zygote, tmp_path: Path, request: pytest.FixtureRequest, kill_summary: KillSummary,
) -> None:
    """Kill at every point the workload reaches, before and after the call: each
    write, sync, rename, unlink and truncate of the file layer by caller (rotation,
    segment preparation, checkpoints and segment removal, compaction, close), each
    LMDB sync and apply, each named failpoint, in the open, the run and the close.
    Points are discovered by running the engine (killpoints.py), not listed."""
    with seeded(SEED, request.node.nodeid):
        tally = Tally()
        sweep = PointSweep()
        lock = threading.Lock()
        lanes = [
            StoreLane(zygote, tmp_path / f"lane{i}", f"sweep{i}",
                      random.Random(f"{SEED}/sweep/{i}"), tally, discover=True)
            for i in range(SWEEP_LANES)
        ]

        def census(lane: StoreLane) -> None:
            """Children that are not killed: they report every point and its hits."""
            for _ in range(2):
                config = lane.config(Kill("point"))
                config.max_acks, config.compact_after = 60, 4
                inc = lane.run_child(Kill("point"), config)
                with lock:
                    sweep.learn(inc)

        def done() -> bool:
            with lock:
                return (tally.kills >= SWEEP_KILL_FLOOR
                        and not sweep.unkilled(SWEEP_MIN_FREQUENCY))

        def drive(lane: StoreLane) -> None:
            census(lane)
            while not done() and lane.cycle < SWEEP_MAX_CYCLES // SWEEP_LANES:
                with lock:
                    plan = sweep.next_plan(lane.rng)
                if plan is None:
                    return
                inc = lane.run_child(Kill("point", plan=plan))
                with lock:
                    sweep.learn(inc)
                    sweep.record(plan, inc)
            lane.final_check()

        _in_parallel(*(lambda lane=lane: drive(lane) for lane in lanes))
        combos = sweep.combos()
        killed = [c for c in combos if sweep.kills[c]]
        kill_summary.add("kill-point sweep", tally.kills, SWEEP_KILL_FLOOR,
                         f"{len(killed)} of {len(combos)} (point, phase, when) killed at")
        print(f"\nkill-point sweep, seed {SEED}: {tally.summary()}\n{sweep.table()}")
        assert tally.kills >= SWEEP_KILL_FLOOR
        assert sweep.unkilled(SWEEP_MIN_FREQUENCY) == []
        points = {c[0] for c in killed}
        for needed in ("failpoint.wal.before_write", "fs.writev@WALWriter.append",
                       "fs.fdatasync@WALWriter.append", "fs.rename@compact",
                       "fs.unlink@Checkpointer._remove_segments_through", "lmdb.sync@",
                       "lmdb.apply", "fs.truncate@WALWriter._trim"):
            assert any(p.startswith(needed) for p in points), f"never killed at {needed}"
        assert {c[1] for c in killed} == {"open", "run", "close"}


@pytest.mark.parametrize("failpoint", FAILPOINTS)
def test_crash_torture_failpoint_kills_lose_no_acknowledged_commit(
    zygote: Zygote, tmp_path: Path, request: pytest.FixtureRequest, kill_summary: KillSummary,
    failpoint: str,
) -> None:
    """A kill exactly at each named failpoint of the engine: at the first hit after
    the open, and at a later one after some commits. A failpoint that committing,
    checkpointing, compacting and closing never reach (an export's, say) must be
    killed at by the suite of its own feature: its name must appear in one."""
    with seeded(SEED, request.node.nodeid):
        tally = Tally()
        lane = StoreLane(zygote, tmp_path, failpoint, random.Random(f"{SEED}/{failpoint}"),
                         tally)
        probe = Kill("point", plan=KillPlan(f"failpoint.{failpoint}"))  # the first hit
        if lane.run_child(probe).killed_at is None:
            elsewhere = [p.relative_to(REPO_ROOT) for p in (REPO_ROOT / "tests").rglob("*.py")
                         if p.name != Path(__file__).name and failpoint in p.read_text()]
            assert elsewhere, (f"failpoint {failpoint} is reached neither by the store "
                               "workload nor named by any suite under tests/")
            return
        for i in range(1, FAILPOINT_KILLS):
            if i % 3 == 0:
                plan = KillPlan(f"failpoint.{failpoint}")
            else:
                plan = KillPlan(f"failpoint.{failpoint}", nth=lane.rng.randint(1, 3),
                                after_acks=lane.rng.randint(1, 40))
            lane.run_child(Kill("point", plan=plan))
        lane.final_check()
        kill_summary.add(f"failpoint {failpoint}", tally.kills, FAILPOINT_KILLS)
        assert tally.kills == FAILPOINT_KILLS, tally.summary()
        assert tally.acknowledged > 0


def test_crash_torture_failpoints_are_the_engines() -> None:
    """The failpoint list is read from the engine's code (so a new one is tortured
    too); the write path's three are in it."""
    assert {"wal.before_write", "wal.after_write", "wal.after_sync"} <= set(FAILPOINTS)


def test_crash_torture_kills_while_creating_a_store(
    zygote: Zygote, tmp_path: Path, request: pytest.FixtureRequest, kill_summary: KillSummary,
) -> None:
    """A kill at each point of a store's creation (the STORE file, the directories,
    the LMDB environment, the first segment) leaves a directory that opens as an
    empty store and then works."""
    with seeded(SEED, request.node.nodeid):
        rng = random.Random(f"{SEED}/create")
        tally = Tally()
        sweep = PointSweep()
        census = StoreLane(zygote, tmp_path / "census", "census", rng, tally, discover=True)
        config = census.config(Kill("point"))
        config.max_acks = 5
        sweep.learn(census.run_child(Kill("point"), config))
        plans = [KillPlan(point, when, phase="open")
                 for point, phase, when in sweep.combos() if phase == "open"]
        assert len(plans) >= 10, sweep.table()
        killed: set[str] = set()
        for n, plan in enumerate(plans):
            # a point of a background thread (segment preparation) may come after the
            # open or not at all in a short life: a few tries
            for attempt in range(3):
                lane = StoreLane(zygote, tmp_path / f"c{n}-{attempt}", f"create{n}", rng, tally)
                inc = lane.run_child(Kill("point", plan=plan))
                # the directory keeps working: a child commits, the parent checks
                lane.run_child(Kill("acks", acks=5))
                shutil.rmtree(lane.root)
                if inc.killed_at is not None:
                    killed.add(plan.point)
                    break
        kill_summary.add("kills while creating a store", tally.kills, 40)
        print(f"\ncreation kills, seed {SEED}: {tally.summary()}; killed at {sorted(killed)}")
        creating = {p for p in (plan.point for plan in plans)
                    if p.endswith(("@write_store_file", "@open_store", "@_recover",
                                   "@SnapshotStore.__init__"))}
        assert len(creating) >= 5, creating
        assert creating <= killed
        assert tally.kills >= 40, tally.summary()


def test_crash_torture_compaction_killed_between_its_renames_verifies(
    zygote: Zygote, tmp_path: Path, request: pytest.FixtureRequest, kill_summary: KillSummary,
) -> None:
    """A compaction killed right after moving the old snapshot aside leaves no
    snapshot/ directory: verify must read the one the next open will use, not report
    the WAL's start as damage (it did). Then one killed right after moving the new
    one in, with the old one still beside it."""
    with seeded(SEED, request.node.nodeid):
        tally = Tally()
        lane = StoreLane(zygote, tmp_path, "compact", random.Random(f"{SEED}/compact"), tally)
        # the parent's check closes the store, which removes the checkpointed
        # segments: the WAL now starts above LSN 1
        lane.run_child(Kill("acks", acks=40))
        for nth in (1, 2):
            plan = KillPlan("fs.rename@compact", "after", nth=nth)
            config = lane.config(Kill("point", plan=plan))
            config.compact_after = 3
            inc = lane.run_child(Kill("point", plan=plan), config)
            assert inc.killed_at == ("fs.rename@compact", "after")
        lane.final_check()
        kill_summary.add("compaction killed between renames", tally.kills, 3)
        assert tally.kills == 3


def _build_replay_store(path: Path, records: int) -> dict[str, Any]:
    """A store whose whole WAL (many small segments) must be replayed on open: built,
    closed with its segments kept, then its snapshot (and any base copy) removed.
    Returns its state."""
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
    for leftover in path.iterdir():
        if leftover.is_dir() and leftover.name.startswith("snapshot"):
            shutil.rmtree(leftover)
    return state


def test_crash_torture_kill_during_replay_gives_the_same_state(
    zygote: Zygote, tmp_path: Path, request: pytest.FixtureRequest, kill_summary: KillSummary,
) -> None:
    """A crash during replay and a second open give the same state. Children
    open a store that must replay ~75 segments and are killed in the replay, twice per
    round: at a random LMDB transaction of the replay, then at a random moment of what
    is left of it (this child may finish); then the parent opens the store and finds
    exactly the state the WAL holds."""
    with seeded(SEED, request.node.nodeid):
        _kill_during_replay(zygote, tmp_path, kill_summary)


def _replay_child(
    zygote: Zygote, path: Path, log: Path, *, plan: KillPlan | None = None,
    kill_after: float | None = None, discover: bool = False,
) -> tuple[Incarnation, int, float]:
    """A child that opens (replays) the store and exits; killed by ``plan`` or
    ``kill_after`` seconds after the fork. Returns its report, exit code and life."""
    config = StoreChildConfig(path=str(path), seed=0, generation=0, open_only=True,
                              kill=plan.to_dict() if plan else None, discover=discover)
    inc = Incarnation(0)
    child = zygote.spawn("tests.crash.store_load:child_main", config.to_dict(), log, inc.feed)
    try:
        if kill_after is not None:
            child.sleep(kill_after)
            child.kill()
        code = child.finish(CHILD_TIMEOUT_SECONDS)
    finally:
        child.kill()
        child.close()
    return inc, code, time.monotonic() - child.started


def _kill_during_replay(zygote: Zygote, tmp_path: Path, kill_summary: KillSummary) -> None:
    rng = random.Random(f"{SEED}/replay")
    pristine = tmp_path / "pristine"
    expected = _build_replay_store(pristine, REPLAY_RECORDS)
    segments = len(list((pristine / "wal").iterdir()))
    assert segments >= 40
    # calibrate: how long a child's whole life takes (mostly the replay), and how
    # many LMDB transactions the replay makes
    probe = tmp_path / "probe"
    shutil.copytree(pristine, probe)
    inc, code, life_seconds = _replay_child(zygote, probe, tmp_path / "probe.log",
                                            discover=True)
    assert code == 0
    assert inc.ready
    assert inc.replayed == REPLAY_RECORDS
    replay_txns = inc.counts.get(("lmdb.apply_puts@_replay_segment", "open"), 0)
    assert replay_txns >= 2, inc.counts
    shutil.rmtree(probe)

    kills = in_open = point_kills = 0
    for round_ in range(REPLAY_ROUNDS):
        store_path = tmp_path / f"round{round_}"
        shutil.copytree(pristine, store_path)
        # the kill point first: a timed kill may leave less to replay
        plans = [KillPlan("lmdb.apply_puts@_replay_segment", rng.choice(("before", "after")),
                          nth=rng.randint(1, replay_txns), phase="open"), None]
        for k, plan in enumerate(plans):
            log = tmp_path / f"replay-{round_}-{k}.log"
            kill_after = None if plan else rng.uniform(0, 1.1 * life_seconds)
            inc, code, _ = _replay_child(zygote, store_path, log, plan=plan,
                                         kill_after=kill_after)
            where = f"round {round_} child {k} ({plan or 'timed kill'}), log {log}"
            if code == -signal.SIGKILL:
                kills += 1
                point_kills += plan is not None
                in_open += not inc.ready
                if plan is not None and inc.killed_at is None:
                    raise CrashViolation(f"{where}: killed before its kill point")
            elif code != 0 or plan is not None:
                raise CrashViolation(f"{where}: the replaying child ended with {code}")
            verify = engine.verify(store_path)
            if not verify.ok:
                raise CrashViolation(f"{where}: verify after a kill during replay: "
                                     f"{verify.damage}")
        with Store.open(store_path) as store:
            got = dict(store.scan())
            if got != expected:
                missing = sorted(set(expected) - set(got))[:5]
                wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])[:5]
                raise CrashViolation(
                    f"round {round_}: the state after replays killed midway differs: missing "
                    f"{missing}, different {wrong}, extra {sorted(set(got) - set(expected))[:5]}")
            assert store.applied_lsn == REPLAY_RECORDS
            assert store.next_lsn == REPLAY_RECORDS + 1
        after = engine.verify(store_path)
        if not after.ok:
            raise CrashViolation(f"round {round_}: verify after the final open: {after.damage}")
        shutil.rmtree(store_path)
    kill_summary.add("kills during replay", kills, REPLAY_ROUNDS + REPLAY_ROUNDS // 4,
                     f"{in_open} inside the open; {segments} segments, "
                     f"{replay_txns} replay transactions")
    print(f"\nreplay kills, seed {SEED}: {kills} kills, {in_open} inside the open "
          f"(a child's replay of {segments} segments takes {life_seconds * 1000:.0f} ms)")
    assert point_kills == REPLAY_ROUNDS
    assert kills >= REPLAY_ROUNDS + REPLAY_ROUNDS // 4
    assert in_open >= REPLAY_ROUNDS


# -- the checker is not vacuous ----------------------------------------------------------


def _incarnation(gen: int, lines: list[str]) -> Incarnation:
    inc = Incarnation(gen)
    for line in lines:
        inc.feed(line)
    return inc


def test_crash_checker_reports_lost_ack_and_half_applied_batch(tmp_path: Path) -> None:
    """The checker flags a missing acknowledged write and a half batch."""
    gen = 1
    with Store.open(tmp_path / "s") as store:
        full = store.put(single_key(0, 0), make_value(0, 0, gen, 3)).lsn
        # a "batch" of thread 1 of which only one key made it
        half = store.put(batch_key(1, 0), make_value(1, 0, gen, 0)).lsn
        inc = _incarnation(gen, [
            "R 1 1",
            "I 0 0 " + json.dumps([["put", single_key(0, 0), 3]]),
            f"A 0 0 {full}",
            "I 0 1 " + json.dumps([["put", single_key(0, 1), 5]]),
            f"A 0 1 {full + 100}",  # acknowledged, but not in the store
            "I 1 0 " + json.dumps([["put", batch_key(1, 0), 0], ["put", batch_key(1, 1), 0]]),
        ])
        problems = check_store(store, Ledger(), inc)
    text = "\n".join(problems)
    assert half > full
    assert f"key {single_key(0, 1)!r}: expected the acknowledged write" in text
    assert "half-applied commit 0 of writer g1/t1" in text


def test_crash_checker_reports_an_ack_without_intent_and_a_stray_key(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        lsn = store.put(single_key(0, 0), make_value(0, 0, 1, 0)).lsn
        store.put("stray", 1)
        no_intent = _incarnation(1, [f"A 0 0 {lsn}"])
        assert any("without an intent" in p for p in check_store(store, Ledger(), no_intent))
        stray = _incarnation(1, ["I 0 0 " + json.dumps([["put", single_key(0, 0), 0]]),
                                 f"A 0 0 {lsn}"])
        assert check_store(store, Ledger(), stray) == ["keys no commit wrote: ['stray']"]


def test_crash_checker_accepts_consistent_store_and_advances_ledger(tmp_path: Path) -> None:
    gen = 1
    ledger = Ledger()
    with Store.open(tmp_path / "s") as store:
        first = store.put(single_key(0, 0), make_value(0, 0, gen, 1)).lsn
        second = store.delete(single_key(0, 0)).lsn
        with store.batch() as b:  # thread 1's in-flight batch, wholly applied
            b.put(batch_key(1, 0), make_value(1, 0, gen, 2))
            b.delete(batch_key(1, 1))
        inc = _incarnation(gen, [
            "I 0 0 " + json.dumps([["put", single_key(0, 0), 1]]),
            f"A 0 0 {first}",
            "I 0 1 " + json.dumps([["del", single_key(0, 0), None]]),
            f"A 0 1 {second}",
            "I 1 0 " + json.dumps([["put", batch_key(1, 0), 2], ["del", batch_key(1, 1), None]]),
        ])
        assert check_store(store, ledger, inc) == []
    assert ledger.known[single_key(0, 0)] == KeyState(second, None, True)
    assert ledger.known[batch_key(1, 1)].deleted
    assert ledger.max_lsn == second + 1
    assert ledger.acknowledged == 2
