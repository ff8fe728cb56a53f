"""The file-fault sweep, in the manner of SQLite's I/O-error tests.

A clean run of the workload (tests/engine/_faults.py: create, commits across
segment rotations, checkpoint, close, an open that replays the whole WAL,
repair of a damaged sealed segment, a last open) records every file
operation the engine makes through ``engine._fs``. Then, for every N and
every mode, the workload runs again with the Nth operation failing: EIO once,
EIO from then on, ENOSPC from then on (for operations that take space), an
EINTR or a short write from the ``os`` call beneath (absorbed: the workload
must finish untouched), or a short write the seam reports (the WAL must not
count it as written). Each case must end in one of the project's errors or a
clean run, and opening without the fault must show every acknowledged commit,
the failed one wholly or not at all.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import engine
from engine import DiskFullError, Store, StoreIOError, StorePoisonedError, _fs
from tests.crash.summary import KillSummary
from tests.engine._faults import MODES, applies, check_case, fast_dir, record_workload

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
    ops = record_workload(sweep_dir / "clean")
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
