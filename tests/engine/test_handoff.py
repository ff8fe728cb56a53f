"""The hand-off between a store's writer and a sync worker in another process
(engine/handoff.py, engine/worker.py), SIGKILLed at each of its steps.

Pulled pages go through the inbox: the worker writes each page durably, the writer
(or the worker itself, as the writer, when none is open) merges it through its WAL
in one record that also moves the pull cursor and the page's sequence number, then
removes it. Whatever step a kill lands on, the pages that were written are merged
exactly once (each version in one merge record), the pull cursor the worker resumes
from never skips a page nor repeats one already merged, and no file is left behind.
Also: a writer's open waits out a worker's hand-off instead of failing, and a
writer's 'remote' commit waits for the worker's acknowledgement in ``SYNC`` and fails
at once when the worker is gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cbor2
import pytest

from tests.engine._handoff_child import PAGE_KEYS, page_cursor
from walsync.engine import Store
from walsync.engine.errors import (
    CorruptionError,
    NoReplicatorError,
    ReplicatorStoppedError,
    StoreLockedError,
)
from walsync.engine.handoff import (
    INBOX_DIR,
    INBOX_SEQ,
    SYNC_FILE,
    inbox_pages,
    read_inbox_page,
    write_inbox_page,
)
from walsync.engine.record import KIND_MERGE, decode_entry

CHILD = Path(__file__).with_name("_handoff_child.py")
REPO = CHILD.parents[2]
PAGES = 3
WORKER_POINTS = ["inbox.write", "inbox.rename", "inbox.fsync_dir", "inbox.written",
                 "inbox.merge", "inbox.unlink", "inbox.removed"]
WRITER_POINTS = ["inbox.merge", "inbox.unlink", "inbox.removed"]


def child(*args: str, timeout: float = 60.0) -> int:
    done = subprocess.run([sys.executable, str(CHILD), *args], cwd=REPO, timeout=timeout,
                          capture_output=True, text=True)
    assert done.returncode in (0, -9), (args, done.returncode, done.stdout, done.stderr)
    return done.returncode


def stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


def new_store(path: Path) -> Path:
    with Store.open(path) as store:
        store.put("local", 1)
    return path


def resume_page(path: Path) -> int:
    """The first page the worker pulls next: the one after its pull cursor, as a
    worker starting now reads it (after a writer's open replayed the WAL, which the
    worker's open does when no writer is open: a merge record the kill left unapplied
    holds the cursor)."""
    with Store.open(path, create=False) as store:
        cursor = store.sync_ledger.pull_cursor
    return next((p for p in range(PAGES) if page_cursor(p) > cursor), PAGES)


def check_merged_once(path: Path) -> None:
    """Every page merged, each version in exactly one merge record, nothing left over."""
    with Store.open(path, create=False) as store:  # a writer's open merges what waits
        assert inbox_pages(path) == []
        assert not [n for n in os.listdir(path / INBOX_DIR) if n.endswith(".tmp")]
        for page in range(PAGES):
            for j in range(PAGE_KEYS):
                assert store.get(f"r/{page}/{j}") == {"page": page, "j": j}
        assert store.get("shared") == {"page": PAGES - 1}
        assert store.get("local") == 1
        assert store.sync_ledger.pull_cursor == page_cursor(PAGES - 1)
        records: dict[str, int] = {}
        dots: dict[tuple[str, int], int] = {}
        seqs: dict[int, int] = {}
        for rec in store.wal_reader().read(0, store.applied_lsn, 1 << 20):
            if rec.kind != KIND_MERGE:
                continue
            for key, entry in rec.ops:
                if not key:  # the meta op: the page this record merged
                    seq = cbor2.loads(entry)[INBOX_SEQ]
                    seqs[seq] = seqs.get(seq, 0) + 1
                if key:
                    records[key] = records.get(key, 0) + 1
                    for sib in decode_entry(entry):
                        dot = (sib.version.origin, sib.version.lsn)
                        dots[dot] = dots.get(dot, 0) + 1
    assert all(records[f"r/{p}/{j}"] == 1 for p in range(PAGES) for j in range(PAGE_KEYS))
    assert records["shared"] == PAGES
    assert set(dots.values()) == {1}, "a version merged twice"
    assert seqs == dict.fromkeys(range(1, PAGES + 1), 1), f"pages merged: {seqs}"


@pytest.mark.parametrize("nth", [1, 2])
@pytest.mark.parametrize("point", WORKER_POINTS)
def test_worker_killed_at_each_step_of_a_hand_off(tmp_path: Path, point: str, nth: int) -> None:
    path = new_store(tmp_path / "s")
    killed = child("pull", str(path), point, str(nth), "0", str(PAGES))
    assert killed == -9, f"the worker never reached {point} #{nth}"
    first = resume_page(path)
    child("pull", str(path), "none", "0", str(first), str(PAGES - first))
    check_merged_once(path)


@pytest.mark.parametrize("nth", [1, 2])
@pytest.mark.parametrize("point", WRITER_POINTS)
def test_writer_killed_at_each_step_of_merging_the_inbox(tmp_path: Path, point: str,
                                                          nth: int) -> None:
    from tests.engine._handoff_child import page_items

    path = new_store(tmp_path / "s")
    for page in range(PAGES):  # what a worker beside a live writer leaves
        after = page_cursor(page - 1) if page else 0
        write_inbox_page(path, page + 1, after, page_cursor(page), page_items(page))
    assert child("apply", str(path), point, str(nth)) == -9
    assert resume_page(path) == PAGES  # the pages still there still count for the worker
    check_merged_once(path)


def test_writer_open_waits_out_a_workers_hand_off(tmp_path: Path) -> None:
    """The worker holds the writer lock for one merge; a writer opening then waits."""
    path = new_store(tmp_path / "s")
    script = (
        "import sys, time\n"
        "from walsync.engine import Store\n"
        "from walsync.engine.handoff import SyncLock\n"
        "from pathlib import Path\n"
        "root = Path(sys.argv[1])\n"
        "SyncLock(root).acquire('test')\n"
        "s = Store.open(root, create=False)\n"
        "print('held', flush=True)\n"
        "time.sleep(1.0)\n"
        "s.close()\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        started = time.monotonic()
        with Store.open(path, create=False) as store:  # lock_timeout_seconds 0
            waited = time.monotonic() - started
            store.put("after", 1)
        assert 0.3 < waited < 10.0
    finally:
        stop(proc)


def test_writer_lock_held_by_another_writer_still_fails_at_once(tmp_path: Path) -> None:
    path = new_store(tmp_path / "s")
    script = ("import sys, time\nfrom walsync.engine import Store\n"
              "s = Store.open(sys.argv[1], create=False)\nprint('held', flush=True)\n"
              "time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(StoreLockedError, match=f"pid {proc.pid}"):
            Store.open(path, create=False)
        assert time.monotonic() - started < 1.0
    finally:
        stop(proc)


def test_remote_commit_in_the_writer_waits_for_the_workers_acknowledgement(
        tmp_path: Path) -> None:
    """Durability 'remote' with the replicator in another process: the commit returns
    once ``SYNC`` acknowledges its LSN, and fails at once when the worker is killed."""
    path = new_store(tmp_path / "s")
    with Store.open(path, create=False) as store:
        with pytest.raises(NoReplicatorError):  # no worker: refused before writing
            store.put("k", 0, durability="remote")
        lsn_before = store.applied_lsn
    # a stand-in worker: holds SYNC.lock, acknowledges LSN 3 after 0.5 s
    script = (
        "import sys, time, json\n"
        "from pathlib import Path\n"
        "from walsync.engine.handoff import SyncLock, SyncFile\n"
        "root = Path(sys.argv[1])\n"
        "SyncLock(root).acquire('test')\n"
        "f = SyncFile(root)\n"
        "f.update(acked_lsn=0, retain_floor=1, sync_retain=True)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "time.sleep(0.5)\n"
        "f.update(acked_lsn=int(sys.argv[2]), retain_floor=int(sys.argv[2]) + 1)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(path), str(lsn_before + 1)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        with Store.open(path, create=False) as store:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            started = time.monotonic()
            result = store.put("k", 1, durability="remote")
            assert result.lsn == lsn_before + 1
            assert 0.3 < time.monotonic() - started < 5.0
            assert json.loads((path / SYNC_FILE).read_text())["acked_lsn"] == result.lsn
            assert store.retain_floor == result.lsn + 1  # the writer's checkpoints keep it
            # the worker dies while a commit waits for it: that commit fails at once
            errors: list[BaseException] = []

            def waiting() -> None:
                try:
                    store.put("k", 2, durability="remote")
                except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                    errors.append(exc)

            thread = threading.Thread(target=waiting)
            thread.start()
            time.sleep(0.3)
            stop(proc)
            killed = time.monotonic()
            thread.join(10.0)
            assert time.monotonic() - killed < 1.0
            assert len(errors) == 1
            assert isinstance(errors[0], ReplicatorStoppedError)
            assert "no sync worker runs" in str(errors[0])
            assert store.get("k") == 2  # durable locally, as the error says
            # and with no worker any more, the next one is refused before it is written
            with pytest.raises(NoReplicatorError):
                store.put("k", 3, durability="remote")
            assert store.get("k") == 2
    finally:
        stop(proc)


def test_damaged_inbox_page_is_refused_and_named(tmp_path: Path) -> None:
    from tests.engine._handoff_child import page_items

    path = new_store(tmp_path / "s")
    page = write_inbox_page(path, 1, 0, page_cursor(0), page_items(0))
    raw = bytearray(page.read_bytes())
    raw[-3] ^= 0x40  # real damage to the page's bytes
    page.write_bytes(bytes(raw))
    with Store.open(path, create=False) as store:
        assert store.get("r/0/0") is None  # never merged from damaged bytes
        assert inbox_pages(path) == [(1, page)]  # kept for the operator
    with pytest.raises(CorruptionError, match="checksum") as caught:
        read_inbox_page(page)
    assert str(page) in str(caught.value)
    assert "inbox directory aside" in caught.value.hint


def test_the_workers_acknowledgement_is_the_writers_retention_floor(tmp_path: Path) -> None:
    """The writer's checkpoints keep every WAL record the worker (another process) has
    not had acknowledged: the floor it writes to ``SYNC``, across the two processes."""
    path = new_store(tmp_path / "s")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from walsync.engine.handoff import SyncLock, SyncFile\n"
        "root = Path(sys.argv[1])\n"
        "SyncLock(root).acquire('test')\n"
        "f = SyncFile(root)\n"
        "for line in sys.stdin:\n"
        "    acked = int(line)\n"
        "    f.update(acked_lsn=acked, retain_floor=acked + 1, sync_retain=True)\n"
        "    print('acked', acked, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO)

    def worker_acks(lsn: int) -> None:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(f"{lsn}\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == f"acked {lsn}"

    try:
        worker_acks(1)
        with Store.open(path, create=False, segment_bytes=4096) as store:
            for i in range(300):
                store.put(f"k{i}", "x" * 200)
            store.checkpoint()
            oldest = store.wal_reader().oldest_lsn()
            assert oldest is not None
            assert oldest <= 2, "the writer removed WAL the worker had not shipped"
            assert store.retain_floor == 2
            worker_acks(250)
            store.checkpoint()
            oldest = store.wal_reader().oldest_lsn()
            assert oldest is not None
            assert 2 < oldest <= 251  # what the server has goes, what it lacks stays
            assert store.wal_reader().read(250, 260, 10)[0].lsn == 251
    finally:
        stop(proc)


def test_one_replicator_per_store_across_processes(tmp_path: Path) -> None:
    """A writer's own replicator and a sync worker exclude each other (SYNC.lock),
    and the refusal names the process that syncs the store."""
    from walsync.engine.errors import SyncError
    from walsync.engine.worker import open_sync_worker

    path = new_store(tmp_path / "s")
    script = ("import sys, time\nfrom walsync.engine.worker import open_sync_worker\n"
              "w = open_sync_worker(sys.argv[1])\nprint('worker', flush=True)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)

    class Waits:
        def wait_acknowledged(self, lsn: int, timeout_seconds: float) -> None:
            raise AssertionError("never called")

    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "worker"
        with Store.open(path, create=False) as store:  # the worker is no writer
            store.put("beside", 1)
            with pytest.raises(SyncError, match=f"pid {proc.pid}"):
                store.attach_replicator(Waits())
        stop(proc)
        with Store.open(path, create=False) as store:  # once it is gone, the writer may
            waits = Waits()
            store.attach_replicator(waits)
            refused = subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO,
                                     capture_output=True, text=True, timeout=60)
            assert refused.returncode != 0  # and then no worker
            assert f"pid {os.getpid()}" in refused.stderr
            assert "SyncError" in refused.stderr
            store.detach_replicator(waits)
        worker = open_sync_worker(path)  # detached: a worker may start
        worker.close()
    finally:
        stop(proc)
