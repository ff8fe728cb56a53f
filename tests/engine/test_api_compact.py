"""Store.compact(): the snapshot file shrinks after mass deletes, and nothing is lost."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from walsync.engine import Store
from walsync.engine.snapshot.bulk import _compaction_paths


def _fill_and_delete(store: Store, n: int) -> None:
    for i in range(n):
        store.put(f"k/{i:05d}", b"x" * 2048, durability="none")
    for i in range(n):
        if i % 10:
            store.delete(f"k/{i:05d}", durability="none")


def test_compact_shrinks_the_snapshot_and_keeps_every_live_key(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        _fill_and_delete(store, 3000)
        result = store.compact()
        assert result.snapshot_bytes_after < result.snapshot_bytes_before / 2
        assert len(store.keys("k/")) == 300
        assert store.get("k/00010") == b"x" * 2048
        assert store.get_versions("k/00011")[0].version.deleted  # tombstones kept
        store.put("after", 1)
    with Store.open(tmp_path / "s") as store:
        assert store.get("after") == 1
        assert len(store.keys("k/")) == 300


def test_compact_purge_tombstones_drops_deleted_keys_entirely(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        _fill_and_delete(store, 200)
        store.compact(purge_tombstones=True)
        assert store.get_versions("k/00011") == []
        assert len(store.keys("k/")) == 20


def test_compact_refuses_to_purge_tombstones_of_a_syncing_store(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        store.put("a", 1)
        store.sync_ledger.set_acked_lsn(1)
        with pytest.raises(ValueError, match="replica"):
            store.compact(purge_tombstones=True)


@pytest.mark.parametrize("stage", ["copied", "old_moved_aside"])
def test_compact_interrupted_by_a_crash_leaves_a_whole_snapshot(tmp_path: Path,
                                                              stage: str) -> None:
    """Recreate the directories a crash inside compact() can leave, then reopen."""
    with Store.open(tmp_path / "s") as store:
        for i in range(50):
            store.put(f"k{i}", i)
    snapshot = tmp_path / "s" / "snapshot"
    fresh, old = _compaction_paths(snapshot)
    shutil.copytree(snapshot, fresh)
    if stage == "old_moved_aside":
        snapshot.rename(old)
    with Store.open(tmp_path / "s") as store:
        assert [store.get(f"k{i}") for i in range(50)] == list(range(50))
    assert not fresh.exists()
    assert not old.exists()


def test_compact_while_other_threads_commit_loses_and_blocks_nothing(tmp_path: Path) -> None:
    import threading

    with Store.open(tmp_path / "s") as store:
        _fill_and_delete(store, 1000)
        stop = threading.Event()
        written: list[int] = []
        errors: list[BaseException] = []

        def writer(n: int) -> None:
            i = 0
            try:
                while not stop.is_set():
                    store.put(f"w/{n}/{i}", i, durability="none")
                    written.append(1)
                    i += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        for _ in range(3):
            store.compact()
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "a committer never woke up"
        assert not errors
        assert len(store.keys("w/")) == len(written)


def test_checkpoints_from_another_thread_during_compactions_do_not_fail(tmp_path: Path) -> None:
    """Compaction closes and reopens the LMDB environment: a checkpoint racing it
    (the background one, or another thread's) must wait, not poison the store."""
    import threading

    errors: list[BaseException] = []
    stop = threading.Event()
    with Store.open(tmp_path / "s") as store:
        _fill_and_delete(store, 300)

        def checkpoints() -> None:
            while not stop.is_set():
                try:
                    store.checkpoint()
                except BaseException as exc:  # noqa: BLE001 - collected for the assert
                    errors.append(exc)
                    return

        worker = threading.Thread(target=checkpoints)
        worker.start()
        try:
            for i in range(15):
                store.put(f"during/{i}", i)
                store.compact()
        finally:
            stop.set()
            worker.join(30)
        assert errors == []
        assert store.poisoned is None
        store.put("after", 1)
    with Store.open(tmp_path / "s") as store:
        assert store.get("during/14") == 14
        assert store.get("after") == 1
