"""The file-fault sweep, in the manner of SQLite's I/O-error tests.

A clean run of the workload (tests/engine/_faults.py: create, commits across
segment rotations, checkpoints in the background and asked for, close, an
open that replays the whole WAL, repair of a damaged sealed segment, a last
open) records every file operation the engine makes through ``engine._fs``.
Then, for every N and every mode, the workload runs again with the Nth
operation failing: EIO once, EIO from then on, ENOSPC from then on (for
operations that take space), an EINTR or a short write from the ``os`` call
beneath (absorbed: the workload must finish untouched), or a short write the
seam reports (the WAL must not count it as written). Each case must end in one
of the project's errors or a clean run, and opening without the fault must show
every acknowledged commit, the failed one wholly or not at all.

The store's helper threads are swept too: every operation of the segment
preparer and of the background checkpoint fails in turn (EIO, ENOSPC), and the
writes LMDB makes on the applier thread (a commit's apply, after it returned) and on
its own thread copying the snapshot's base are failed through libfiu
(tests/engine/_fiu_threads_child.py). A helper's failure reaches no call
directly, yet it must stop the store: a case fails when a fault fired and
nothing noticed (no error surfaced and the store was not poisoned).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.crash.summary import KillSummary
from tests.engine import _fiu_threads_child
from tests.engine._faults import (
    HELPER_MODES,
    HELPER_THREADS,
    MODES,
    applies,
    check_case,
    fast_dir,
    record_workload,
)
from walsync import engine
from walsync.engine import DiskFullError, Store, StoreIOError, StorePoisonedError, _fs

#: at least this many cases per mode run (the workload makes ~170 operations;
#: a change that shrinks it a lot would silently weaken the sweep)
FLOORS = {
    "eio": 150, "eio-persistent": 150, "enospc": 150, "eintr": 50, "short": 20,
    "short-seam": 20,
}


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Iterator[Path]:
    with fast_dir(tmp_path) as path:
        yield path


@pytest.mark.parametrize("mode", MODES)
def test_faults_sweep_every_operation_fails_cleanly_and_loses_nothing(
    sweep_dir: Path, mode: str, fault_summary: KillSummary
) -> None:
    ops = record_workload(sweep_dir / "clean").main_ops
    shutil.rmtree(sweep_dir / "clean")
    targets = [n for n, op in enumerate(ops, start=1) if applies(mode, op)]
    violations: list[str] = []
    for n in targets:
        path = sweep_dir / f"n{n}"
        violations += check_case(path, mode, n)
        shutil.rmtree(path, ignore_errors=True)
    fault_summary.add(f"file-operation sweep, {mode}", len(targets), FLOORS[mode],
                      f"{len(violations)} violations")
    assert len(targets) >= FLOORS[mode], f"only {len(targets)} {mode} cases"
    assert not violations, "\n".join(violations[:40])


#: at least this many cases per helper thread and mode
HELPER_FLOORS = {"walsync-prepare-segment": 10, "walsync-checkpoint": 20}


@pytest.mark.parametrize("mode", HELPER_MODES)
@pytest.mark.parametrize("thread", HELPER_THREADS)
def test_faults_sweep_every_helper_thread_operation_fails_and_stops_the_store(
    sweep_dir: Path, thread: str, mode: str, fault_summary: KillSummary
) -> None:
    """The Nth file operation of a helper thread fails: no call is waiting for it,
    so the store must poison itself (the next write says why) and lose nothing."""
    ops = record_workload(sweep_dir / "clean").helper_ops(thread)
    shutil.rmtree(sweep_dir / "clean")
    targets = list(range(1, len(ops) + 1))
    violations: list[str] = []
    for n in targets:
        path = sweep_dir / f"n{n}"
        violations += check_case(path, mode, n, thread)
        shutil.rmtree(path, ignore_errors=True)
    fault_summary.add(f"helper-thread sweep, {thread}, {mode}", len(targets),
                      HELPER_FLOORS[thread], f"{len(violations)} violations")
    assert len(targets) >= HELPER_FLOORS[thread], f"only {len(targets)} cases: {ops}"
    assert not violations, "\n".join(violations[:40])


REPO = Path(__file__).resolve().parents[2]
_WRITES = ["posix/io/rw/pwrite", "posix/io/rw/writev", "posix/io/rw/pwritev"]
_COPY_WRITES = ["posix/io/rw/write"]
#: per helper stage: (libfiu points, errno, absorbed): EINTR, and a short write
#: where LMDB writes the rest (its copy thread), must be absorbed; EIO, ENOSPC and a
#: short write LMDB takes for EIO (a transaction's pages) must stop the store
LMDB_HELPER_VARIANTS: dict[str, list[tuple[list[str], int, bool]]] = {
    "applier": [(_WRITES, errno.EIO, False), (_WRITES, errno.ENOSPC, False),
                (_WRITES, errno.EINTR, True), ([f"{p}/reduce" for p in _WRITES], 0, False)],
    "base-copy": [(_COPY_WRITES, errno.EIO, False), (_COPY_WRITES, errno.ENOSPC, False),
                  ([f"{p}/reduce" for p in _COPY_WRITES], 0, True)],
    "base-copy-background": [(_COPY_WRITES, errno.EIO, False),
                             (_COPY_WRITES, errno.ENOSPC, False)],
}
LMDB_HELPER_FLOORS = {"applier": 20, "base-copy": 150, "base-copy-background": 100}


def _run_fiu_child(tmp: Path, name: str, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fiu_run = shutil.which("fiu-run")
    if fiu_run is None:
        pytest.fail("the helper-thread LMDB cases need libfiu's fiu-run: install the Debian "
                    "packages fiu-utils and libfiu0 (apt-get install -y fiu-utils)",
                    pytrace=False)
    plan, result = tmp / f"{name}.plan.json", tmp / f"{name}.result.json"
    plan.write_text(json.dumps(cases))
    proc = subprocess.run(
        [fiu_run, "-x", "-f", "", sys.executable, "-m", "tests.engine._fiu_threads_child",
         str(plan), str(result)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, f"the fiu child failed ({proc.returncode}):\n{proc.stderr}"
    outcomes: list[dict[str, Any]] = json.loads(result.read_text())
    assert len(outcomes) == len(cases)
    return outcomes


def _judge_lmdb_helper(case: dict[str, Any], out: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    if out["raw_error"]:
        problems.append(f"an error that is not the project's escaped:\n{out['raw_error']}")
    if out["close"] != "ok":
        problems.append(f"close: {out['close']}")
    if out["injected"] != 1:
        problems.append(f"the fault was injected {out['injected']} times")
    stopped = out["failed"] or out["poisoned"] is not None
    if case["absorbed"]:
        if stopped:
            problems.append(f"not absorbed: {out['error_type']}: {out['error']} "
                            f"(poisoned: {out['poisoned']})")
        if out["later"] != "accepted":
            problems.append(f"a write after an absorbed fault was {out['later']}")
    elif not stopped:
        problems.append("the helper thread's write failed and nothing noticed: the step "
                        "succeeded and the store was not poisoned")
    else:
        full = case["errno"] == errno.ENOSPC
        reason = out["poisoned"] or ""
        if full != ("disk full" in reason):
            problems.append(f"poisoned for {reason!r} after errno {case['errno']}")
        if case["stage"] == "applier" and out["failed"]:
            # the commit was acknowledged before its apply (its record is durable):
            # the failure shows as the poisoning, and the later write is refused
            problems.append(f"the acknowledged commit raised {out['error_type']}")
        if case["stage"] not in ("base-copy-background", "applier"):
            expected = "DiskFullError" if full else "StorePoisonedError"
            if out["error_type"] != expected:
                problems.append(f"{out['error_type']} ({out['error']}), not {expected}")
        where = "snapshot" if case["stage"] == "applier" else "snapshot-base"
        if f"{case['dir']}/{where}" not in reason:
            problems.append(f"the error does not name the file under {where}/: {reason}")
        if out["later"] != "refused":
            problems.append(f"a write after the failure was {out['later']}")
        # an acknowledged big value stays readable (served from memory until applied)
        if out["reads_ok"] is not True or out["big_read"] != (case["stage"] == "applier"):
            problems.append(f"reads after the failure: {out['reads_ok']}, big {out['big_read']}")
    # reopened without faults: the WAL replays what the failed apply did not
    with Store.open(case["dir"]) as store:
        state = dict(store.scan())
    expected_keys = {f"k{i}" for i in out["acked"]}
    if case["stage"] == "applier":
        expected_keys.add("big")  # durable in the WAL before LMDB was asked
    if out["later"] == "accepted":
        expected_keys.add("later")
    if set(state) != expected_keys:
        problems.append(f"after reopening: {sorted(set(state) ^ expected_keys)} differ")
    elif any(state[f"k{i}"] != _fiu_threads_child.small_value(i) for i in out["acked"]) or (
            "big" in state and state["big"] != _fiu_threads_child.big_value()):
        problems.append("after reopening a value differs")
    report = engine.verify(case["dir"])
    if not report.ok:
        problems.append(f"verify: {report.damage}")
    return problems


def test_faults_sweep_helper_threads_lmdb_writes_fail_and_stop_the_store(
    sweep_dir: Path, fault_summary: KillSummary
) -> None:
    """Every write LMDB makes on the applier thread and on its own copy thread
    (asked-for and background checkpoints) fails in turn: EIO and ENOSPC stop the
    store with the error naming the file, EINTR and short writes are absorbed; a
    fault that fires unnoticed fails the case."""
    counting = [
        {"dir": str(sweep_dir / f"count-{n}"), "stage": stage, "points": points,
         "errno": 0, "nth": 0, "absorbed": absorbed}
        for n, (stage, points, absorbed) in enumerate(
            (stage, points, absorbed) for stage, variants in LMDB_HELPER_VARIANTS.items()
            for points, _code, absorbed in variants)
    ]
    codes = [code for variants in LMDB_HELPER_VARIANTS.values() for _p, code, _a in variants]
    counts = _run_fiu_child(sweep_dir, "count", counting)
    cases: list[dict[str, Any]] = []
    for base, code, counted in zip(counting, codes, counts, strict=True):
        assert counted["raw_error"] is None, counted["raw_error"]
        assert not counted["failed"], counted
        assert counted["poisoned"] is None, counted
        cases += [{**base, "dir": str(sweep_dir / f"case-{len(cases) + i}"), "errno": code,
                   "nth": nth} for i, nth in enumerate(range(1, counted["seen"] + 1))]
    outcomes = _run_fiu_child(sweep_dir, "fail", cases)
    violations: list[str] = []
    kinds: dict[str, int] = {}
    for case, out in zip(cases, outcomes, strict=True):
        kind = case["stage"]
        kinds[kind] = kinds.get(kind, 0) + 1
        where = f"{kind} {case['points'][0]} errno {case['errno']} at call {case['nth']}"
        violations += [f"{where}: {p}" for p in _judge_lmdb_helper(case, out)]
    for stage, floor in LMDB_HELPER_FLOORS.items():
        fault_summary.add(f"helper-thread LMDB writes (libfiu), {stage}", kinds.get(stage, 0),
                          floor, f"{len([v for v in violations if v.startswith(stage + ' ')])} "
                          "violations")
    assert all(kinds.get(stage, 0) >= floor for stage, floor in LMDB_HELPER_FLOORS.items()), kinds
    assert not violations, "\n".join(violations[:30])


def _failing(code: int) -> object:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(code, f"injected: {os.strerror(code)}")

    return fail


def test_faults_sweep_open_failing_after_the_lock_lets_go_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing the pid into LOCK fails after the flock was taken: the open raises
    StoreIOError naming the store, and the lock is not left held (a second open
    in this process would otherwise find the store locked by itself)."""
    path = tmp_path / "s"
    with Store.open(path) as store:
        store.put("a", 1)
    monkeypatch.setattr(_fs, "pwrite", _failing(errno.EIO))
    with pytest.raises(StoreIOError, match="opening store") as exc:
        Store.open(path)
    assert str(path) in str(exc.value)
    assert isinstance(exc.value.__cause__, OSError)
    assert exc.value.__cause__.errno == errno.EIO
    monkeypatch.undo()
    with Store.open(path) as store:
        assert store.get("a") == 1


def test_faults_sweep_open_on_a_full_disk_says_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_fs, "atomic_write", _failing(errno.ENOSPC))
    with pytest.raises(DiskFullError, match="disk full opening store") as exc:
        Store.open(tmp_path / "s")
    assert "free disk space" in exc.value.hint


def test_faults_sweep_failed_checkpoint_poisons_and_keeps_the_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint whose directory sync fails raises StorePoisonedError (not a raw
    OSError) and stops the store: a later checkpoint that 'succeeded' would stand
    on a sync that failed."""
    path = tmp_path / "s"
    store = Store.open(path, segment_bytes=4096)
    for i in range(12):
        store.put(f"k{i}", "x" * 900)
    monkeypatch.setattr(_fs, "fsync_dir", _failing(errno.EIO))
    with pytest.raises(StorePoisonedError, match="during checkpoint"):
        store.checkpoint()
    monkeypatch.undo()
    with pytest.raises(StorePoisonedError):
        store.checkpoint()
    with pytest.raises(StorePoisonedError):
        store.put("later", 1)
    assert store.get("k11") == "x" * 900
    store.close()
    with Store.open(path) as reopened:
        assert dict(reopened.scan()) == {f"k{i}": "x" * 900 for i in range(12)}
    assert engine.verify(path).ok


def test_faults_sweep_short_write_reported_by_the_seam_is_never_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write call that reports fewer bytes than the frame: the commit fails and
    the next frame is not written after the hole."""
    path = tmp_path / "s"
    store = Store.open(path)
    store.put("a", 1)

    def short(fd: int, buffers: list[bytes]) -> int:
        data = b"".join(buffers)
        return os.write(fd, data[: len(data) // 2])

    monkeypatch.setattr(_fs, "writev", short)
    with pytest.raises(StorePoisonedError, match="short write"):
        store.put("b", {"x": "y" * 100})
    monkeypatch.undo()
    with pytest.raises(StorePoisonedError):
        store.put("c", 3)
    store.close()
    with Store.open(path) as reopened:
        assert dict(reopened.scan()) == {"a": 1}
        assert reopened.recovery is not None
        assert reopened.recovery.torn_tail is not None
        reopened.put("d", 4)
    with Store.open(path) as again:
        assert dict(again.scan()) == {"a": 1, "d": 4}
    assert engine.verify(path).ok
