"""A machine crash under an open store: the snapshot is rebuilt from its base and the WAL.

LMDB runs unsynced between checkpoints, so after a power loss its file may be
garbage. These tests stand in for the power loss by SIGKILLing a writer, then
overwriting the snapshot file with garbage and making ``engine._fs.boot_id``
answer a different boot (what a restarted machine shows). Every acknowledged
commit must come back; the untrusted file goes to quarantine, never deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from walsync.engine import Store, StoreStateError, _fs
from walsync.engine.base import SnapshotRebuild, read_base_lsn
from walsync.engine.layout import StoreLayout

REPO_ROOT = Path(__file__).resolve().parents[2]
SEGMENT_BYTES = 64 * 1024

#: commits ``before`` values, checkpoints (when asked), commits ``after`` more,
#: prints the last LSN and waits to be killed
CHILD = f"""
import sys, time
from walsync.engine import Store
path, before, after, checkpoint = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
store = Store.open(path, segment_bytes={SEGMENT_BYTES})
for i in range(before):
    store.put(f"k/{{i:05d}}", {{"i": i, "pad": "x" * 900}})
if checkpoint == "yes":
    store.checkpoint()
for i in range(before, before + after):
    store.put(f"k/{{i:05d}}", {{"i": i, "pad": "x" * 900}})
store.delete("k/00001")
store.applied_lsn  # applied too: a reader in another process reads the snapshot
print(store.next_lsn - 1, flush=True)
time.sleep(60)
"""


def _run_and_kill(path: Path, before: int, after: int, *, checkpoint: bool) -> int:
    """A writer commits, then dies by SIGKILL with the store open; its last LSN."""
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(before), str(after),
         "yes" if checkpoint else "no"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip(), "the child died before it finished committing"
            return int(line)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)


def _tear_snapshot(path: Path) -> None:
    """What a power loss may leave of pages written since the last sync: garbage."""
    data = path / "snapshot" / "data.mdb"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.write(os.urandom(size))


def _check_all_there(store: Store, count: int) -> None:
    for i in range(count):
        got = store.get(f"k/{i:05d}")
        if i == 1:
            assert got is None
            assert store.get_versions("k/00001")[0].version.deleted
        else:
            assert got == {"i": i, "pad": "x" * 900}, f"k/{i:05d} lost"


@pytest.fixture
def other_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fs, "boot_id", lambda: "a-later-boot-of-this-machine")


@pytest.mark.crash
@pytest.mark.parametrize("checkpoint", [True, False], ids=["with-base", "no-base-yet"])
def test_machine_crash_rebuilds_a_garbage_snapshot_from_base_and_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoint: bool
) -> None:
    path = tmp_path / "s"
    last = _run_and_kill(path, 150, 150, checkpoint=checkpoint)
    assert (path / "OPEN").exists(), "a writer killed with the store open leaves its marker"
    _tear_snapshot(path)
    monkeypatch.setattr(_fs, "boot_id", lambda: "a-later-boot-of-this-machine")
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        rebuild = store.recovery.snapshot_rebuilt if store.recovery else None
        assert isinstance(rebuild, SnapshotRebuild)
        assert "machine restarted" in rebuild.reason
        if checkpoint:
            assert rebuild.base_lsn == 150
        else:
            assert rebuild.base_lsn == 0  # rebuilt from empty: every segment was kept
        assert store.next_lsn - 1 == last
        _check_all_there(store, 300)
        quarantined = Path(rebuild.quarantine) / "snapshot" / "data.mdb"
        assert quarantined.exists(), "the untrusted snapshot is kept, not deleted"
        store.put("after", 1)
    assert not (path / "OPEN").exists(), "a clean close removes the marker"
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        assert store.recovery is not None
        assert store.recovery.snapshot_rebuilt is None
        assert store.get("after") == 1
        _check_all_there(store, 300)


@pytest.mark.crash
def test_process_crash_in_the_same_boot_trusts_the_snapshot(tmp_path: Path) -> None:
    """A process crash leaves the kernel's pages intact: no rebuild, no quarantine."""
    path = tmp_path / "s"
    _run_and_kill(path, 50, 50, checkpoint=True)
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        assert store.recovery is not None
        assert store.recovery.snapshot_rebuilt is None
        _check_all_there(store, 100)
    assert not (path / "quarantine").exists()


@pytest.mark.crash
def test_unknown_boot_id_treats_an_unclean_shutdown_as_a_machine_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s"
    _run_and_kill(path, 40, 40, checkpoint=True)
    _tear_snapshot(path)
    monkeypatch.setattr(_fs, "boot_id", lambda: None)
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        assert store.recovery is not None
        assert store.recovery.snapshot_rebuilt is not None
        assert "cannot tell" in store.recovery.snapshot_rebuilt.reason
        _check_all_there(store, 80)


@pytest.mark.crash
def test_reader_refuses_an_untrusted_snapshot_until_a_writer_rebuilds_it(
    tmp_path: Path, other_boot: None
) -> None:
    path = tmp_path / "s"
    _run_and_kill(path, 20, 20, checkpoint=False)
    with pytest.raises(StoreStateError, match="machine restarted") as info:
        Store.open(path, readonly=True)
    assert "open it for writing once" in (info.value.hint or "")
    Store.open(path).close()
    with Store.open(path, readonly=True) as reader:
        _check_all_there(reader, 40)


@pytest.mark.crash
def test_crash_during_the_rebuild_rebuilds_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other_boot: None
) -> None:
    path = tmp_path / "s"
    _run_and_kill(path, 60, 60, checkpoint=True)
    _tear_snapshot(path)
    import walsync.engine.opening as store_module

    def die(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed during replay")

    monkeypatch.setattr(store_module, "recover", die)
    with pytest.raises(KeyboardInterrupt):
        Store.open(path, segment_bytes=SEGMENT_BYTES)
    monkeypatch.undo()
    # the machine went down again during the replay: yet another boot
    monkeypatch.setattr(_fs, "boot_id", lambda: "a-third-boot-of-this-machine")
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        assert store.recovery is not None
        assert store.recovery.snapshot_rebuilt is not None
        _check_all_there(store, 120)
    assert len(list((path / "quarantine").iterdir())) == 2


@pytest.mark.crash
def test_process_crash_during_the_rebuild_keeps_the_rebuilt_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other_boot: None
) -> None:
    """The marker is rewritten before replay touches LMDB: a process crash in the
    replay (same boot) leaves pages the kernel still writes, so they are trusted."""
    path = tmp_path / "s"
    _run_and_kill(path, 60, 60, checkpoint=True)
    _tear_snapshot(path)
    import walsync.engine.opening as store_module

    def die(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed during replay")

    real_recover = store_module.recover
    monkeypatch.setattr(store_module, "recover", die)
    with pytest.raises(KeyboardInterrupt):
        Store.open(path, segment_bytes=SEGMENT_BYTES)
    monkeypatch.setattr(store_module, "recover", real_recover)
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        assert store.recovery is not None
        assert store.recovery.snapshot_rebuilt is None
        _check_all_there(store, 120)
    assert len(list((path / "quarantine").iterdir())) == 1


def test_checkpoint_writes_a_synced_base_and_removes_wal_only_below_it(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        for i in range(300):
            store.put(f"k/{i:05d}", {"i": i, "pad": "x" * 900})
        result = store.checkpoint()
        assert result.segments_removed > 0
        assert read_base_lsn(store._layout) == 300
        base_file = path / "snapshot-base" / "data.mdb"
        assert stat.S_IMODE(base_file.stat().st_mode) == 0o600
        info = json.loads((path / "snapshot-base" / "BASE").read_text())
        assert info["lsn"] == 300
        assert info["format"] == 1
        for i in range(300, 600):
            store.put(f"k/{i:05d}", {"i": i, "pad": "x" * 900})
        first_kept = store._layout.list_segments()[0][0]
        assert first_kept <= 301
    # the close synced the snapshot but made no new base: the WAL above it stays
    segments = [first for first, _ in store._layout.list_segments()]
    assert segments
    assert segments[0] <= 301
    assert read_base_lsn(store._layout) == 300
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        assert store.get("k/00599") == {"i": 599, "pad": "x" * 900}
        store.checkpoint()
        assert read_base_lsn(store._layout) == 600
        assert all(first > 300 for first, _ in store._layout.list_segments())


@pytest.mark.parametrize("leftover", ["fresh-complete", "fresh-partial", "old-only"])
def test_base_swap_cut_short_by_a_crash_leaves_a_whole_base(tmp_path: Path,
                                                           leftover: str) -> None:
    """Recreate what a crash inside the base swap can leave, then reopen."""
    path = tmp_path / "s"
    with Store.open(path) as store:
        for i in range(30):
            store.put(f"k/{i}", i)
        store.checkpoint()
    base = path / "snapshot-base"
    fresh, old = path / "snapshot-base.tmp", path / "snapshot-base.old"
    if leftover == "fresh-complete":
        base.rename(fresh)  # the new base was complete, the old one moved aside and gone
    elif leftover == "fresh-partial":
        fresh.mkdir()
        (fresh / "data.mdb").write_bytes(b"half a copy")  # no BASE yet: not complete
    else:
        base.rename(old)  # killed between the two renames
    with Store.open(path) as store:
        assert read_base_lsn(store._layout) == 30
        assert store.get("k/29") == 29
    assert base.is_dir()
    assert not fresh.exists()
    assert not old.exists()


def _wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_background_checkpoint_makes_a_base_once_the_wal_outweighs_the_snapshot(
    tmp_path: Path,
) -> None:
    """Few keys overwritten often: the WAL outgrows the snapshot, and the checkpoint
    that commits trigger (every checkpoint_every_bytes) copies it and lets the WAL go."""
    opts = {"segment_bytes": 4096 * 4, "checkpoint_every_bytes": 64 * 1024}
    with Store.open(tmp_path / "s", **opts) as store:
        for i in range(400):
            store.put(f"k/{i % 4}", "x" * 900, durability="none")
        _wait_for(lambda: read_base_lsn(store._layout) > 0, "no checkpoint made a base")
        assert store._layout.list_segments()[0][0] > 1, "the WAL below the base stayed"


def test_background_checkpoint_copies_nothing_while_the_snapshot_outweighs_the_wal(
    tmp_path: Path,
) -> None:
    """Many distinct keys: the snapshot is bigger than the WAL written so far, so the
    triggered checkpoints sync it but make no copy (writes stay at most doubled)."""
    opts = {"segment_bytes": 4096 * 4, "checkpoint_every_bytes": 64 * 1024}
    with Store.open(tmp_path / "s", **opts) as store:
        for i in range(600):
            store.put(f"k/{i:05d}", "x" * 900, durability="none")
        store.checkpoint()
        assert read_base_lsn(store._layout) == 600
        before = store.stats().checkpoints
        for i in range(100):  # ~100 KB of WAL: past checkpoint_every_bytes
            store.put(f"k/{i:05d}", "y" * 900, durability="none")
        _wait_for(lambda: store.stats().checkpoints > before, "no background checkpoint ran")
        assert store._snapshot.live_bytes() > 3 * store._checkpointer.wal_bytes_above_base()
        assert read_base_lsn(store._layout) == 600


def test_close_makes_a_base_when_the_wal_outweighs_the_snapshot(tmp_path: Path) -> None:
    """Overwriting a few keys many times: the WAL grows past the snapshot, so the
    close copies the small snapshot and lets the WAL go (the next open scans none)."""
    path = tmp_path / "s"
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        for i in range(400):
            store.put(f"k/{i % 4}", {"i": i, "pad": "x" * 900}, durability="none")
    assert read_base_lsn(StoreLayout(path)) == 400
    assert StoreLayout(path).list_segments() == []
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        assert store.recovery is not None
        assert store.recovery.segments_read == 0
        assert store.get("k/3") == {"i": 399, "pad": "x" * 900}


@pytest.mark.crash
def test_reader_beside_a_live_writer_opens_where_there_is_no_boot_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a boot id any OPEN marker looks like a crash, but one under a live
    writer (it holds the lock) is that writer's own: readers are not refused."""
    path = tmp_path / "s"
    monkeypatch.setattr(_fs, "boot_id", lambda: None)
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), "30", "0", "no"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip()
            with Store.open(path, readonly=True) as reader:
                _check_all_there(reader, 30)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    with pytest.raises(StoreStateError, match="not closed cleanly"):
        Store.open(path, readonly=True)  # the writer is dead now: its marker is a crash's


@pytest.mark.crash
def test_store_trimmed_before_bases_existed_gets_one_on_its_first_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store whose checkpoints removed WAL before there were bases has nothing to
    rebuild from: its first open makes a base, so a later power loss loses nothing."""
    path = tmp_path / "s"
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        for i in range(300):
            store.put(f"k/{i:05d}", {"i": i, "pad": "x" * 900})
        store.checkpoint()
    shutil.rmtree(path / "snapshot-base")  # what such a store looks like
    segments = StoreLayout(path).list_segments()
    assert not segments or segments[0][0] > 1  # the WAL alone cannot rebuild it
    _run_and_kill(path, 0, 40, checkpoint=False)  # its first open, then a crash
    assert read_base_lsn(StoreLayout(path)) == 300
    _tear_snapshot(path)
    monkeypatch.setattr(_fs, "boot_id", lambda: "a-later-boot-of-this-machine")
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        assert store.recovery is not None
        assert store.recovery.snapshot_rebuilt is not None
        _check_all_there(store, 300)
