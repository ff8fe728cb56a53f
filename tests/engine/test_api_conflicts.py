"""Store.conflicts: the keys holding concurrent versions with different values.

Listed from the snapshot's conflicts table, kept in the apply's own transaction; checked
here against every key's siblings read directly, across local writes, merges of other
nodes' versions (tombstones among them), reopening, replay of the whole WAL into an empty
snapshot, compaction, and a snapshot from before the table existed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import cbor2
import lmdb
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from walsync.engine import Store
from walsync.engine.record import CODEC_NONE
from walsync.engine.versions import Sibling, Version, join_vv

KEYS = ["a", "a/1", "a/2", "b", "b/1", "runs/1", "é"]
PREFIXES = ["", "a", "a/", "b", "runs/", "z"]
VALUES = [1, 2, "x", None]  # None: a tombstone
ORIGINS = ["B", "C"]


def _by_reading_every_key(store: Store, prefix: str = "") -> dict[str, list[Any]]:
    """What the conflicts of ``store`` are, from each key's visible siblings."""
    out = {}
    for key, _ in store.iter_siblings(prefix):
        versions = store.get_versions(key)
        if len(versions) > 1:
            out[key] = versions
    return out


def _remote(store: Store, key: str, origin: str, counter: int, value: Any,
            dominating: bool) -> Sibling:
    """A version of ``key`` from ``origin``: concurrent with what the store holds
    (it saw nothing of it), or dominating it (it saw all of it)."""
    vv = {origin: counter}
    if dominating:
        vv = join_vv([*(v.version.vv for v in store.get_versions(key)), vv])
    data = None if value is None else cbor2.dumps(value)
    hlc = (1_700_000_000_000 + counter) << 16
    return Sibling(Version(origin, counter, hlc, vv, 0, data is None), CODEC_NONE, data)


def _drop_conflicts_table(snapshot_dir: Path) -> None:
    """Make the snapshot look written before the conflicts table existed."""
    env = lmdb.open(str(snapshot_dir), max_dbs=4, subdir=True)
    try:
        table = env.open_db(b"conflicts")
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            txn.drop(table, delete=True)
            txn.delete(b"conflicts_built", db=meta)
    finally:
        env.close()


class ConflictsModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="walsync-conflicts-"))
        self.path = self.dir / "store"
        self.store: Store | None = None
        self.counters = dict.fromkeys(ORIGINS, 0)

    def _open(self) -> Store:
        return Store.open(self.path, node_id="A", durability="none", segment_bytes=4096)

    @initialize()
    def start(self) -> None:
        self.store = self._open()
        self.s.set_retain_floor(1)  # the whole WAL stays: lose_snapshot replays all of it

    @property
    def s(self) -> Store:
        assert self.store is not None
        return self.store

    @rule(key=st.sampled_from(KEYS), value=st.sampled_from(VALUES))
    def write(self, key: str, value: Any) -> None:
        if value is None:
            self.s.delete(key)
        else:
            self.s.put(key, value)

    @rule(items=st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(ORIGINS),
                                   st.sampled_from(VALUES), st.booleans()),
                         min_size=1, max_size=4))
    def merge(self, items: list[tuple[str, str, Any, bool]]) -> None:
        siblings = []
        for key, origin, value, dominating in items:
            self.counters[origin] += 1
            siblings.append((key, _remote(self.s, key, origin, self.counters[origin], value,
                                          dominating)))
        self.s.apply_remote(siblings)

    @rule()
    def reopen(self) -> None:
        self.s.close()
        self.store = self._open()

    @rule()
    def lose_snapshot(self) -> None:
        """Replay every record into an empty snapshot: the table is kept by replay."""
        self.s.close()
        shutil.rmtree(self.path / "snapshot")
        shutil.rmtree(self.path / "snapshot-base", ignore_errors=True)
        self.store = self._open()
        assert self.s.recovery is not None
        assert self.s.recovery.replayed_records == self.s.applied_lsn

    @rule()
    def snapshot_from_before_the_table(self) -> None:
        self.s.close()
        _drop_conflicts_table(self.path / "snapshot")
        self.store = self._open()

    @rule()
    def compact(self) -> None:
        self.s.compact()

    @invariant()
    def listed_as_the_siblings_say(self) -> None:
        if self.store is None:
            return
        for prefix in PREFIXES:
            expected = _by_reading_every_key(self.s, prefix)
            assert dict(self.s.conflicts(prefix)) == expected
            if expected:
                first = next(iter(sorted(expected, key=str.encode)))
                assert [k for k, _ in self.s.conflicts(prefix, limit=1)] == [first]

    def teardown(self) -> None:
        try:
            if self.store is not None:
                self.store.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


ConflictsModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_conflicts_listed_as_every_key_s_siblings_say = ConflictsModel.TestCase


def _concurrent_delete(store: Store, key: str) -> None:
    """Another node's delete of ``key``, concurrent with the local write, that wins."""
    hlc = (2**42) << 16  # later than any local write: the tombstone wins
    store.apply_remote([(key, Sibling(Version("B", 1, hlc, {"B": 1}, 0, True), CODEC_NONE,
                                      None))])


def test_conflicts_lists_a_write_that_lost_to_a_concurrent_delete(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", node_id="A") as store:
        store.put("k", 2)
        store.put("other", 1)
        _concurrent_delete(store, "k")
        assert store.get("k") is None  # the key reads as absent ...
        assert store.keys("k") == []
        ((key, versions),) = store.conflicts()  # ... and is in conflict
        assert key == "k"
        assert [(v.value, v.version.deleted) for v in versions] == [(2, False), (None, True)]
        store.put("k", 3)  # a write resolves it
        assert list(store.conflicts()) == []


def test_conflicts_of_a_store_from_before_the_table_are_listed_by_readers_and_indexed_by_the_writer(
        tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Store.open(path, node_id="A") as store:
        for i in range(20):
            store.put(f"k{i:02d}", i)
        for i in (3, 7, 11):
            _concurrent_delete(store, f"k{i:02d}")
    _drop_conflicts_table(path / "snapshot")
    with Store.open(path, readonly=True) as reader:  # no table: it reads every entry
        assert [k for k, _ in reader.conflicts()] == ["k03", "k07", "k11"]
    with Store.open(path) as store:  # the writer builds the table
        assert [k for k, _ in store.conflicts("k0")] == ["k03", "k07"]
    env = lmdb.open(str(path / "snapshot"), max_dbs=4, subdir=True, readonly=True)
    try:
        with env.begin() as txn:
            listed = [bytes(k) for k, _ in txn.cursor(db=env.open_db(b"conflicts", txn=txn))]
    finally:
        env.close()
    assert listed == [b"k03", b"k07", b"k11"]


def test_conflicts_table_drops_tombstones_purged_by_compaction(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", node_id="A") as store:
        store.delete("gone")
        hlc = (2**42) << 16
        store.apply_remote([("gone", Sibling(Version("B", 1, hlc, {"B": 1}, 0, True),
                                             CODEC_NONE, None))])
        assert len(store.get_versions("gone")) == 1  # two tombstones: one value, no conflict
        assert list(store.conflicts()) == []
        store.compact(purge_tombstones=True)
        assert store.get_versions("gone") == []
        store.put("gone", 1)  # written again: one sibling, nothing listed
        assert list(store.conflicts()) == []


@pytest.mark.parametrize("limit", [0, -1])
def test_conflicts_with_no_room_lists_nothing(tmp_path: Path, limit: int) -> None:
    with Store.open(tmp_path / "s", node_id="A") as store:
        store.put("k", 1)
        _concurrent_delete(store, "k")
        assert list(store.conflicts(limit=limit)) == []
