"""Injected I/O faults: write and fsync errors poison the store, lose nothing committed.

The sweep over every file operation of a workload (every N, EIO once or from
then on, ENOSPC, EINTR, short writes) is tests/engine/test_faults_sweep.py.
Here are the cases it does not reach: a disk that fills half way through a
frame, short writes from the kernel, a failed LMDB apply after the WAL write,
failpoints between write and sync, a commit queued behind a failing one, and
close after a failed fsync. Each time the failing commit raises
StorePoisonedError (DiskFullError, with a hint to free space, for ENOSPC)
naming the store; later writes are refused without touching the file again;
reads and close work; reopening without the fault replays, keeps every
acknowledged commit, and shows the failed commit wholly or not at all.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.engine._faults import Ops, apply_ops, durability_of, ops_of
from walsync import engine
from walsync.engine import (
    Delete,
    DiskFullError,
    Put,
    Store,
    StorePoisonedError,
    _failpoints,
    _fs,
)
from walsync.engine.snapshot import SnapshotStore

SEGMENT_BYTES = 4096
#: commits in the workload; values are ~1 KiB, so a segment holds about three
#: and the workload rotates segments (fsync_dir) several times
WORKLOAD_COMMITS = 14

@dataclass
class Injector:
    """Replaces one ``engine._fs`` function; raises at its ``at``-th call (1-based)."""

    real: Callable[..., Any]
    code: int
    at: int
    persistent: bool
    calls: int = 0
    raised: int = 0
    #: calls made after the first fault (a retry of a failed fsync would show here)
    calls_after_fault: int = 0
    enabled: bool = True
    partial: bool = False  # writev only: write half of the bytes before failing

    def __call__(self, *args: Any) -> Any:
        if not self.enabled:
            return self.real(*args)
        self.calls += 1
        if self.raised:
            self.calls_after_fault += 1
        if self.calls == self.at or (self.persistent and self.calls > self.at):
            self.raised += 1
            if self.partial:
                fd, buffers = args
                data = b"".join(buffers)
                os.write(fd, data[: len(data) // 2])
            raise OSError(self.code, f"injected: {os.strerror(self.code)}")
        return self.real(*args)


@dataclass
class Outcome:
    acknowledged: dict[str, Any] = field(default_factory=dict)
    failed_ops: Ops | None = None
    failed_index: int | None = None
    error: BaseException | None = None


def _run_until_fault(store: Store) -> Outcome:
    out = Outcome()
    for i in range(WORKLOAD_COMMITS):
        ops = ops_of(i)
        try:
            store.commit(ops, durability=durability_of(i))
        except engine.WalsyncError as exc:
            out.failed_ops, out.failed_index, out.error = ops, i, exc
            return out
        out.acknowledged = apply_ops(out.acknowledged, ops)
    return out


def _check_after_fault(store: Store, out: Outcome, code: int, where: str) -> None:
    exc = out.error
    assert exc is not None, f"{where}: no commit failed"
    assert isinstance(exc, StorePoisonedError), f"{where}: {exc!r}"
    assert store.path in str(exc), f"{where}: the error does not name the store: {exc}"
    assert isinstance(exc.__cause__, OSError), where
    assert exc.__cause__.errno == code, where
    if code == errno.ENOSPC:
        assert isinstance(exc, DiskFullError), f"{where}: {exc!r}"
        assert "disk full" in str(exc)
        assert "free disk space" in exc.hint
    else:
        assert not isinstance(exc, DiskFullError), f"{where}: {exc!r}"
        assert "refuses further writes" in str(exc)
    assert store.poisoned is not None
    # later writes are refused, naming the store and the first failure
    with pytest.raises(StorePoisonedError, match="refuses writes since an earlier failure") as e:
        store.put("later", 1)
    assert store.path in str(e.value)
    with pytest.raises(StorePoisonedError):
        store.delete("k0")
    # reads go on: they show exactly what was acknowledged
    assert dict(store.scan()) == out.acknowledged, where
    for key, value in out.acknowledged.items():
        assert store.get(key) == value


def _check_reopened(path: Path, out: Outcome, where: str) -> None:
    assert out.failed_ops is not None
    with_failed = apply_ops(out.acknowledged, out.failed_ops)
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        state = dict(store.scan())
        assert state in (out.acknowledged, with_failed), (
            f"{where}: after reopening the state is neither the acknowledged commits nor "
            f"those plus the failed one (wholly): {sorted(state)}"
        )
        # and the store takes writes again
        lsn = store.put("after-reopen", {"ok": True}).lsn
        assert lsn == store.next_lsn - 1
    report = engine.verify(path)
    assert report.ok, f"{where}: {report.damage}"
    with Store.open(path) as store:
        assert store.get("after-reopen") == {"ok": True}


def test_faults_io_enospc_after_a_partial_write_cuts_the_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fills mid-write: half a frame reaches the file, then ENOSPC."""
    path = tmp_path / "s"
    store = Store.open(path, segment_bytes=SEGMENT_BYTES)
    injector = Injector(_fs.writev, errno.ENOSPC, at=6, persistent=True, partial=True)
    monkeypatch.setattr(_fs, "writev", injector)
    out = _run_until_fault(store)
    _check_after_fault(store, out, errno.ENOSPC, "partial write")
    store.close()
    monkeypatch.undo()
    with Store.open(path) as reopened:
        assert reopened.recovery is not None
        assert reopened.recovery.torn_tail is not None
        assert reopened.recovery.torn_tail.first_lost_lsn == 6
        assert dict(reopened.scan()) == out.acknowledged
    _check_reopened(path, out, "partial write")


def test_faults_io_short_writes_are_completed_by_the_writev_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.writev and os.write may write less than asked: _fs.writev finishes the job."""
    real_writev, real_write = os.writev, os.write
    shorts = {"writev": 0, "write": 0}

    def short_writev(fd: int, buffers: list[bytes]) -> int:
        data = b"".join(buffers)
        if len(data) < 2:
            return real_writev(fd, buffers)
        shorts["writev"] += 1
        return real_write(fd, data[: len(data) // 3 or 1])

    def short_write(fd: int, data: Any) -> int:
        shorts["write"] += 1
        return real_write(fd, bytes(data[:97]))

    path = tmp_path / "s"
    expected: dict[str, Any] = {}
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        store.set_retain_floor(1)
        monkeypatch.setattr(os, "writev", short_writev)
        monkeypatch.setattr(os, "write", short_write)
        for i in range(WORKLOAD_COMMITS):
            store.commit(ops_of(i), durability=durability_of(i))
            expected = apply_ops(expected, ops_of(i))
        monkeypatch.undo()
        assert store.poisoned is None
    assert shorts["writev"] >= WORKLOAD_COMMITS
    assert shorts["write"] > shorts["writev"]  # the loop went round more than once
    # the WAL alone rebuilds the same state: every frame is whole
    shutil.rmtree(path / "snapshot")
    with Store.open(path) as store:
        assert store.recovery is not None
        assert store.recovery.torn_tail is None
        assert store.recovery.replayed_records == WORKLOAD_COMMITS
        assert dict(store.scan()) == expected
    assert engine.verify(path).ok


def test_faults_io_writev_helper_loops_until_every_byte_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "writev", lambda fd, bufs: real_write(fd, b"".join(bufs)[:1]))
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:5])))
    target = tmp_path / "f"
    fd = _fs.open_append(target)
    try:
        buffers = [b"alpha-", b"", b"beta-" * 7, b"gamma"]
        assert _fs.writev(fd, buffers) == sum(len(b) for b in buffers)
    finally:
        os.close(fd)
    monkeypatch.undo()
    assert target.read_bytes() == b"".join(buffers)


def test_faults_io_snapshot_apply_failure_poisons_and_replays_on_reopen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The WAL has the record; LMDB failed to take it: the commit was acknowledged
    (its record is durable) and stays visible, the store is poisoned (the next
    write says why), and reopening applies the record from the WAL."""
    path = tmp_path / "s"
    store = Store.open(path)
    first = store.put("a", 1).lsn
    assert store.applied_lsn == first  # waits for the applier
    calls = {"n": 0}

    def failing(self: SnapshotStore, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        raise OSError(errno.EIO, "injected: LMDB write failed")

    # the applier applies through apply_puts (replay too)
    original = SnapshotStore.apply_puts
    monkeypatch.setattr(SnapshotStore, "apply_puts", failing)
    assert store.put("b", {"x": 2}).lsn == first + 1  # durable in the WAL: acknowledged
    assert store.applied_lsn == first  # waits for the apply, which failed
    monkeypatch.setattr(SnapshotStore, "apply_puts", original)
    assert calls["n"] == 1
    with pytest.raises(StorePoisonedError, match="applied when the store is reopened") as exc:
        store.put("c", 3)
    assert store.path in str(exc.value)
    assert not isinstance(exc.value, DiskFullError)
    with pytest.raises(StorePoisonedError):
        store.put("c", 3)
    assert store.get("a") == 1
    assert store.get("b") == {"x": 2}  # not applied here, but acknowledged...
    store.close()
    with Store.open(path) as reopened:
        assert reopened.recovery is not None
        assert reopened.recovery.replayed_records == 1
        assert reopened.get("b") == {"x": 2}  # ...but durable in the WAL
        assert reopened.get("a") == 1
        assert reopened.next_lsn == first + 2
    assert engine.verify(path).ok


@pytest.fixture
def failpoints() -> Iterator[None]:
    try:
        yield
    finally:
        _failpoints.disable()


@pytest.mark.usefixtures("failpoints")
@pytest.mark.parametrize(
    ("point", "kept"),
    [("wal.before_write", False), ("wal.after_write", True), ("wal.after_sync", True)],
)
def test_faults_io_failpoint_raise_poisons_and_reopen_shows_the_record_or_not(
    tmp_path: Path, point: str, kept: bool
) -> None:
    path = tmp_path / "s"
    store = Store.open(path)
    store.put("a", 1)
    _failpoints.enable(point, "raise")
    batch: Ops = [Put("x", 1), Put("y", 2), Delete("a")]
    with pytest.raises(StorePoisonedError, match="FailpointHit") as exc:
        store.commit(batch)
    _failpoints.disable()
    assert point in str(exc.value)
    assert store.path in str(exc.value)
    with pytest.raises(StorePoisonedError):
        store.put("z", 3)
    assert store.get("a") == 1
    store.close()
    with Store.open(path) as reopened:
        state = dict(reopened.scan())
    assert state == ({"x": 1, "y": 2} if kept else {"a": 1})
    assert engine.verify(path).ok


def test_faults_io_commit_queued_behind_a_failed_write_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that joined the queue while the group commit before it was failing must
    not be written after the failure: its LSN would follow a hole in the log (or a
    failed fsync), and it would be acknowledged on a poisoned store."""
    path = tmp_path / "s"
    store = Store.open(path)
    store.put("a", 1)
    real = _fs.writev
    results: dict[str, Any] = {}
    state = {"calls": 0}

    def second_committer() -> None:
        try:
            results["b"] = store.put("b", 2)
        except engine.WalsyncError as exc:
            results["b"] = exc

    def failing_writev(fd: int, buffers: list[bytes]) -> int:
        state["calls"] += 1
        if state["calls"] == 1:
            thread = threading.Thread(target=second_committer)
            thread.start()
            results["thread"] = thread
            deadline = time.monotonic() + 10
            while not store._pipeline._queue and time.monotonic() < deadline:
                time.sleep(0.001)
            assert store._pipeline._queue, "the second commit never queued"
            raise OSError(errno.EIO, "injected: write failed")
        return real(fd, buffers)

    monkeypatch.setattr(_fs, "writev", failing_writev)
    with pytest.raises(StorePoisonedError):
        store.put("c", 3)
    results["thread"].join(10)
    monkeypatch.undo()
    assert isinstance(results["b"], StorePoisonedError), (
        f"a commit was acknowledged on a poisoned store: {results['b']!r}"
    )
    assert state["calls"] == 1
    store.close()
    with Store.open(path) as reopened:  # no hole: the log is a clean prefix
        assert dict(reopened.scan()) == {"a": 1}
        assert reopened.put("d", 4).lsn == 2
    assert engine.verify(path).ok


def test_faults_io_close_after_fsync_failure_does_not_sync_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsyncgate: after a failed fdatasync, close must not fdatasync the file again (a
    second call could report success for pages the kernel already dropped)."""
    path = tmp_path / "s"
    store = Store.open(path)
    store.put("a", 1, durability="none")
    injector = Injector(_fs.fdatasync, errno.EIO, at=1, persistent=False)
    monkeypatch.setattr(_fs, "fdatasync", injector)
    with pytest.raises(StorePoisonedError):
        store.put("b", 2)
    store.close()
    monkeypatch.undo()
    assert injector.calls == 1
    with Store.open(path) as reopened:
        assert reopened.get("a") == 1
        assert reopened.get("b") == 2  # written before the failed sync; replayed


def test_faults_io_writev_helper_writes_more_buffers_than_iov_max(tmp_path: Path) -> None:
    """A group commit of more frames than one writev call takes (IOV_MAX, 1024 on
    Linux; more fail with EINVAL) is still written whole, in order."""
    buffers = [f"{i:05d};".encode() for i in range(2500)]
    target = tmp_path / "f"
    fd = _fs.open_append(target)
    try:
        assert _fs.writev(fd, buffers) == 6 * 2500
    finally:
        os.close(fd)
    assert target.read_bytes() == b"".join(buffers)

