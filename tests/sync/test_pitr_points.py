"""What a point in time means and what a restore at one takes (sync/point.py,
sync/restore.py), on the memory server: commit times read strictly (an offset or unix
milliseconds), a lost node's runs as they were at the point (not as they are now), its
other keys with ``all_keys``, a prefix, and an LSN the server holds no entry of refused
with the nearest ones named.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest

from walsync.engine import Store
from walsync.engine.errors import NodeNotFoundError, RestorePointError
from walsync.engine.workflow import Workflows
from walsync.sync.memory import MemoryServer
from walsync.sync.point import at_time, parse_lsn, parse_time
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.restore import restore

OPTIONS = ReplicatorOptions(pull_interval_seconds=0.05, batch_wait_seconds=0.001,
                            retry_initial_seconds=0.02, retry_max_seconds=0.3)


def sync(store: Store, server: MemoryServer) -> None:
    rep = Replicator(store, server.transport(), OPTIONS)
    try:
        rep.run_once()
    finally:
        rep.stop()


def test_point_times_take_an_offset_or_unix_ms_and_nothing_else() -> None:
    ms = 1_765_101_600_000  # 2025-12-07T10:00:00Z
    assert parse_time("2025-12-07T10:00:00Z") == ms
    assert parse_time("2025-12-07T12:00:00+02:00") == ms
    assert parse_time("2025-12-07T10:00:00.0009Z") == ms  # millisecond precision: floor
    assert parse_time(str(ms)) == ms
    assert parse_time(ms) == ms
    assert parse_time(dt.datetime(2025, 12, 7, 10, tzinfo=dt.UTC)) == ms
    for bad in ("2025-12-07T10:00:00", "yesterday", "-5", dt.datetime(2025, 12, 7)):
        with pytest.raises(RestorePointError):
            parse_time(bad)
    # the cut holds every HLC of that millisecond, none of the next
    cut = at_time(ms).cut_hlc
    assert cut >> 16 == ms
    assert (cut + 1) >> 16 == ms + 1
    assert parse_lsn("host:a:12") == ("host:a", 12)
    for bad in ("node", "node:", ":3", "node:x"):
        with pytest.raises(RestorePointError):
            parse_lsn(bad)


def test_lost_node_restore_at_a_point_takes_its_runs_and_keys_as_they_were_then(
        tmp_path: Path) -> None:
    server = MemoryServer()
    with Store.open(tmp_path / "a", create=True) as a, \
            Store.open(tmp_path / "b", create=True) as b:
        with Workflows(a).run("w", "r1", total_steps=1) as run:
            run.step("s", lambda: "a's")
        a.put("notes/a", "a's note")
        a.put("notes/shared", "a wrote it")
        sync(a, server)
        time.sleep(0.005)
        cut_ms = int(time.time() * 1000)
        time.sleep(0.005)
        # later: B takes r1 over (its index entry now B's) and the shared key; A makes r2
        sync(b, server)
        Workflows(b).get_run("r1").set_metadata(taken_over_by="b")  # its index entry too
        b.put("notes/shared", "b wrote it")
        sync(b, server)
        own_before = a.applied_lsn
        sync(a, server)  # pulls B's writes: a merge record, nothing of it on the server
        merge_lsn = a.applied_lsn
        assert merge_lsn > own_before
        with Workflows(a).run("w", "r2", total_steps=1) as run:
            run.step("s", lambda: "a's second")
        sync(a, server)
        node_a = a.node_id
    assert server.transport().node_label(node_a, "host-a").known
    transport = server.transport()

    now = restore(transport, tmp_path / "now", lost_node="host-a", all_keys=True)
    assert sorted(now.runs) == ["r2"]  # r1's index entry is B's now
    assert now.other_keys == 1  # notes/a; notes/shared is B's now

    then = restore(transport, tmp_path / "then", lost_node="host-a", all_keys=True,
                   at=cut_ms)
    assert sorted(then.runs) == ["r1"]
    assert then.other_keys == 2
    assert then.point is not None
    assert then.point.last_node == node_a
    with Store.open(tmp_path / "then", readonly=True) as store:
        assert Workflows(store).get_run("r1").output("s") == "a's"
        assert store.get("notes/shared") == "a wrote it"
        assert store.get(".walsync/runs/r2") is None
    assert "only" not in then.covers
    assert "its other keys (2)" in then.covers
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".walsync-restore-")]

    runs_only = restore(transport, tmp_path / "runs-only", lost_node=node_a, at=cut_ms)
    assert runs_only.other_keys is None
    assert "not its other keys" in runs_only.covers
    with Store.open(tmp_path / "runs-only", readonly=True) as store:
        assert store.get("notes/a") is None

    prefix = restore(transport, tmp_path / "prefix", prefix="notes/", at=cut_ms)
    with Store.open(tmp_path / "prefix", readonly=True) as store:
        assert [k for k, _ in store.iter_siblings("")] == ["notes/a", "notes/shared"]
        assert store.get("notes/shared") == "a wrote it"
    assert prefix.point is not None
    assert prefix.point.entries == 2

    # a record the server holds no entry of (B's merge of A's entries): refused, the
    # nearest named; a node no one knows: not found, the known listed
    near = transport.entry_point(node_a, merge_lsn)
    assert near.hlc is None
    assert near.before == own_before
    assert near.after is not None
    with pytest.raises(RestorePointError) as info:
        restore(transport, tmp_path / "merge", lsn=f"host-a:{merge_lsn}")
    assert f"nearest LSNs there: {own_before} before, {near.after} after" in str(info.value)
    assert not (tmp_path / "merge").exists()
    with pytest.raises(NodeNotFoundError) as missing:
        restore(transport, tmp_path / "nobody", lsn="nobody:1")
    assert node_a in str(missing.value)


def test_a_point_before_the_window_retention_moved_is_refused_and_one_inside_is_exact(
        tmp_path: Path) -> None:
    """Compaction moves the window's start (``log_window``'s ``from_hlc``): a point
    before it is refused with the window named; one inside restores what it held (the
    compaction keeps what the state at the window's start needs)."""
    server = MemoryServer()
    transport = server.transport()
    with Store.open(tmp_path / "a", create=True) as a:
        for i in range(5):
            a.put("k", i)
            a.put(f"old/{i}", i)
        sync(a, server)
        early_ms = int(time.time() * 1000)
        time.sleep(0.3)
        transport.log_retention(0.2)
        transport.compact_log()
        window = transport.log_window()
        assert window.from_hlc is not None
        assert window.from_hlc >> 16 > early_ms  # the window moved past the early writes
        a.put("k", "inside")
        sync(a, server)
        inside_ms = int(time.time() * 1000)
    with pytest.raises(RestorePointError) as info:
        restore(transport, tmp_path / "early", at=early_ms)
    assert "before the server's window" in str(info.value)
    report = restore(transport, tmp_path / "inside", at=inside_ms)
    assert report.point is not None
    with Store.open(tmp_path / "inside", readonly=True) as store:
        assert store.get("k") == "inside"
        assert [store.get(f"old/{i}") for i in range(5)] == list(range(5))
