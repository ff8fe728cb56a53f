"""The single-writer lock and read-only opens across processes (README: guarantees)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from walsync.engine import Store, StoreLockedError

REPO_ROOT = Path(__file__).resolve().parents[2]

# A child that opens stores and answers one JSON command per stdin line.
_CHILD = r"""
import json, os, sys, threading
from walsync.engine import Store, WalsyncError

store = None
def reply(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()

reply(pid=os.getpid())
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    try:
        if op == "open":
            store = Store.open(cmd["path"], **cmd.get("kw", {}))
            reply(ok=True, node_id=store.node_id)
        elif op == "put":
            reply(ok=True, lsn=store.put(cmd["key"], cmd["value"]).lsn)
        elif op == "get":
            reply(ok=True, value=store.get(cmd["key"]))
        elif op == "scan":
            reply(ok=True, items=[list(kv) for kv in store.scan(cmd.get("prefix", ""))])
        elif op == "close_after":
            threading.Timer(cmd["seconds"], store.close).start()
            reply(ok=True)
        elif op == "close":
            store.close()
            reply(ok=True)
        elif op == "exit":
            reply(ok=True)
            break
        else:
            reply(error="unknown op")
    except WalsyncError as exc:
        reply(error=type(exc).__name__, message=str(exc), pid=getattr(exc, "pid", None))
"""


class Child:
    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.pid = int(self._read(30)["pid"])

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"child {self.proc.pid} did not answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"child {self.proc.pid} exited: {err}")
        result: dict[str, Any] = json.loads(line)
        return result

    def call(self, timeout: float = 30, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def ok(self, **cmd: Any) -> dict[str, Any]:
        result = self.call(**cmd)
        assert "error" not in result, result
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def spawn() -> Iterator[Any]:
    children: list[Child] = []

    def _spawn() -> Child:
        child = Child()
        children.append(child)
        return child

    yield _spawn
    for child in children:
        child.kill()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


def test_lock_second_process_gets_error_naming_holder_pid(
    store_path: Path, spawn: Any
) -> None:
    with Store.open(store_path) as s:
        s.put("a", 1)
        child = spawn()
        result = child.call(op="open", path=str(store_path))
        assert result["error"] == "StoreLockedError"
        assert result["pid"] == os.getpid()
        assert f"locked by pid {os.getpid()}" in result["message"]
        s.put("b", 2)  # the holder goes on writing
    assert child.ok(op="open", path=str(store_path))  # free once the holder closed
    assert child.ok(op="get", key="b")["value"] == 2


def test_lock_held_by_another_process_names_it(store_path: Path, spawn: Any) -> None:
    child = spawn()
    child.ok(op="open", path=str(store_path))
    child.ok(op="put", key="k", value="from child")
    with pytest.raises(StoreLockedError) as info:
        Store.open(store_path)
    assert info.value.pid == child.pid
    assert f"pid {child.pid}" in str(info.value)
    assert info.value.retryable
    started = time.monotonic()
    with pytest.raises(StoreLockedError):
        Store.open(store_path, lock_timeout_seconds=0.3)
    assert time.monotonic() - started >= 0.29


def test_lock_timeout_waits_until_holder_closes(store_path: Path, spawn: Any) -> None:
    child = spawn()
    child.ok(op="open", path=str(store_path))
    child.ok(op="put", key="k", value="v1")
    started = time.monotonic()
    child.ok(op="close_after", seconds=0.5)
    with Store.open(store_path, lock_timeout_seconds=20) as s:
        waited = time.monotonic() - started
        assert waited >= 0.4
        assert waited < 15
        assert s.get("k") == "v1"
        assert s.put("k", "v2").lsn == 2


def test_lock_of_sigkilled_holder_does_not_block(store_path: Path, spawn: Any) -> None:
    child = spawn()
    child.ok(op="open", path=str(store_path))
    for i in range(20):
        child.ok(op="put", key=f"k{i}", value=i)
    with pytest.raises(StoreLockedError):
        Store.open(store_path)
    os.kill(child.pid, signal.SIGKILL)
    assert child.proc.wait(30) == -signal.SIGKILL
    started = time.monotonic()
    with Store.open(store_path) as s:  # no timeout asked for: must not wait
        assert time.monotonic() - started < 5
        assert [s.get(f"k{i}") for i in range(20)] == list(range(20))
        assert s.recovery is not None
        # LMDB pages written by the dead process survive in the page cache; the rest
        # is replayed: either way, everything up to LSN 20 is there
        assert s.recovery.applied_lsn_before + s.recovery.replayed_records == 20
        assert s.recovery.last_lsn == 20
        assert s.put("after", 1).lsn == 21


def test_lock_file_with_dead_pid_does_not_block(store_path: Path) -> None:
    with Store.open(store_path) as s:
        s.put("a", 1)
    (store_path / "LOCK").write_text("999999999\n")
    with Store.open(store_path) as s:
        assert s.get("a") == 1
    assert (store_path / "LOCK").read_text() == ""  # released on close


def test_lock_readonly_process_reads_while_writer_runs(store_path: Path, spawn: Any) -> None:
    with Store.open(store_path, map_size_bytes=1 << 20, durability="local") as s:
        s.put("runs/1", {"status": "running"})
        s.put("runs/2", "two")
        s.delete("runs/2")
        # another process reads the snapshot: it sees a commit once it is applied
        # (the applier thread, just after the commit returned); this waits for it
        assert s.applied_lsn == 3
        reader = spawn()
        reader.ok(op="open", path=str(store_path), kw={"readonly": True})
        assert reader.ok(op="get", key="runs/1")["value"] == {"status": "running"}
        assert reader.ok(op="scan", prefix="runs/")["items"] == [
            ["runs/1", {"status": "running"}]
        ]
        refused = reader.call(op="put", key="x", value=1)
        assert refused["error"] == "ReadOnlyStoreError"
        # the writer goes on, and grows its LMDB map well past 1 MiB
        s.put("runs/1", {"status": "done"})
        for i in range(40):
            s.put(f"blob/{i:02d}", os.urandom(64 * 1024).hex()[:100_000] + str(i))
        assert s.applied_lsn == 44
        assert reader.ok(op="get", key="runs/1")["value"] == {"status": "done"}
        got = reader.ok(op="get", key="blob/39")["value"]
        assert got == s.get("blob/39")
        assert len(reader.ok(op="scan", prefix="blob/")["items"]) == 40
        # a second read-only process is fine too
        other = spawn()
        other.ok(op="open", path=str(store_path), kw={"readonly": True})
        assert other.ok(op="get", key="blob/00")["value"] == s.get("blob/00")
        reader.ok(op="close")
        other.ok(op="close")
    # and a read-only handle never held the writer lock
    with Store.open(store_path) as again:
        assert again.get("runs/1") == {"status": "done"}


def test_lock_readonly_open_in_another_process_does_not_block_writer(
    store_path: Path, spawn: Any
) -> None:
    with Store.open(store_path) as s:
        s.put("a", 1)
    reader = spawn()
    reader.ok(op="open", path=str(store_path), kw={"readonly": True})
    with Store.open(store_path) as w:
        w.put("a", 2)
        assert w.applied_lsn == 2  # another process sees a commit once it is applied
        assert reader.ok(op="get", key="a")["value"] == 2
    assert reader.ok(op="get", key="a")["value"] == 2
