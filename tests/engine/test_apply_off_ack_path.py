"""A commit returns once its WAL record is durable; the applier thread puts it in
LMDB afterwards (engine/commit.py). Readers in the process see it meanwhile: a
key lookup through the snapshot's ``pending``, a read transaction (scan, view,
count, metadata) by waiting for the applier. A process killed before the apply
loses nothing acknowledged: open replays it.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from walsync.engine import Delete, Put, Store
from walsync.engine.snapshot import SnapshotStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def held_apply(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Every apply to LMDB waits until the event is set (the applier is stalled)."""
    release = threading.Event()
    real = SnapshotStore.apply_puts

    def apply_puts(self: SnapshotStore, *args: Any, **kwargs: Any) -> None:
        assert release.wait(30), "the test never released the apply"
        real(self, *args, **kwargs)

    monkeypatch.setattr(SnapshotStore, "apply_puts", apply_puts)
    yield release
    release.set()


def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_a_commit_returns_before_its_apply_and_reads_see_it(
    tmp_path: Path, held_apply: threading.Event
) -> None:
    with Store.open(tmp_path / "s") as store:
        committing, done = _in_thread(lambda: store.put("k", {"v": 1}))
        committing.join(10)
        # the apply is stalled: with the apply on the acknowledgement path the
        # commit would still be waiting here
        assert not committing.is_alive(), "the commit waited for its LMDB apply"
        lsn = done["value"].lsn
        assert store.get("k") == {"v": 1}
        version = store.get_version("k")
        assert version is not None
        assert version.lsn == lsn
        assert [v.value for v in store.get_versions("k")] == [{"v": 1}]
        # a read transaction holds every acknowledged record: it waits for the apply
        scanning, scanned = _in_thread(lambda: list(store.scan()))
        scanning.join(0.3)
        assert scanning.is_alive()
        held_apply.set()
        scanning.join(10)
        assert scanned["value"] == [("k", {"v": 1})]
        assert store.applied_lsn == lsn


def test_a_delete_and_a_batch_are_seen_before_their_apply(
    tmp_path: Path, held_apply: threading.Event
) -> None:
    held_apply.set()
    with Store.open(tmp_path / "s") as store:
        store.put("gone", 1)
        store.put("kept", 1)
        assert store.applied_lsn == 2
        held_apply.clear()
        store.delete("gone")
        store.commit([Put("kept", 2), Put("new", 3), Delete("never")])
        assert store.get("gone") is None
        assert store.get_version("gone") is None
        assert store.get("kept") == 2
        assert store.get("new") == 3
        assert store.get("never") is None
        held_apply.set()
        assert dict(store.scan()) == {"kept": 2, "new": 3}


def test_random_schedules_read_their_writes_and_replay_the_same(tmp_path: Path) -> None:
    """Threads commit at random (puts, deletes, batches, some without fsync) while
    the applier is slowed at random; each thread reads its own keys back at once
    (get, a view, a scan); after close and reopen the store holds the model."""
    path = tmp_path / "s"
    rng = random.Random(20261207)
    real = SnapshotStore.apply_puts

    def slow_apply(self: SnapshotStore, *args: Any, **kwargs: Any) -> None:
        time.sleep(random.random() * 0.002)
        real(self, *args, **kwargs)

    model: dict[str, Any] = {}
    errors: list[str] = []
    seeds = [rng.randrange(1 << 30) for _ in range(4)]
    SnapshotStore.apply_puts = slow_apply  # type: ignore[method-assign]
    try:
        with Store.open(path, segment_bytes=16384) as store:

            def worker(t: int) -> None:
                r = random.Random(seeds[t])
                mine: dict[str, Any] = {}
                for n in range(150):
                    key = f"t{t}/{r.randrange(12)}"
                    what = r.random()
                    durability = "none" if r.random() < 0.3 else "local"
                    if what < 0.6:
                        value = {"t": t, "n": n}
                        store.put(key, value, durability=durability)
                        mine[key] = value
                    elif what < 0.8:
                        store.delete(key, durability=durability)
                        mine.pop(key, None)
                    else:
                        other = f"t{t}/{r.randrange(12)}"
                        store.commit([Put(key, n), Delete(other)] if other != key
                                     else [Put(key, n)], durability=durability)
                        mine[key] = n
                        if other != key:
                            mine.pop(other, None)
                    check = r.random()
                    if check < 0.5:
                        got = store.get(key)
                        if got != mine.get(key):
                            errors.append(f"get {key}: {got!r} != {mine.get(key)!r}")
                    elif check < 0.7:
                        with store.snapshot() as view:
                            got = view.get(key)
                        if got != mine.get(key):
                            errors.append(f"view {key}: {got!r} != {mine.get(key)!r}")
                    elif check < 0.8:
                        got_all = dict(store.scan(f"t{t}/"))
                        if got_all != mine:
                            errors.append(f"scan t{t}/: {got_all!r} != {mine!r}")
                model.update(mine)

            threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert not any(thread.is_alive() for thread in threads)
            assert not errors, errors[:5]
            assert dict(store.scan()) == model
    finally:
        SnapshotStore.apply_puts = real  # type: ignore[method-assign]
    with Store.open(path) as again:
        assert dict(again.scan()) == model


_CHILD = """
import sys, threading
from walsync.engine import Store
from walsync.engine.snapshot import SnapshotStore
store = Store.open(sys.argv[1])
store.put("before", 0)
assert store.applied_lsn == 1
never = threading.Event()
SnapshotStore.apply_puts = lambda *args, **kwargs: never.wait()  # the apply never lands
for i in range(int(sys.argv[2])):
    print(store.put(f"k{i}", {"i": i}).lsn, flush=True)
print("done", flush=True)
sys.stdin.read()
"""


def test_sigkill_before_the_apply_loses_no_acknowledged_commit(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with subprocess.Popen([sys.executable, "-c", _CHILD, str(path), "25"], cwd=REPO,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        acked = []
        for line in proc.stdout:
            if line.strip() == "done":
                break
            acked.append(int(line))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert acked == list(range(2, 27))
    with Store.open(path) as store:
        assert store.recovery is not None
        assert store.recovery.replayed_records >= 25
        assert [store.get(f"k{i}") for i in range(25)] == [{"i": i} for i in range(25)]
        assert store.get("before") == 0
