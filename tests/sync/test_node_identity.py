"""A node id names one store incarnation (PROTOCOL.md, Node identity): copies of a store
never ship under one id (Riak's kv679), forced restores take a fresh id, and nothing
acknowledged is lost.

Real stores copied with their files, two ways: ``cp -r`` (``shutil.copytree``: a new
directory, which the copy's replicator sees before it ships anything) and a clone its
store cannot tell from the original (the copy's STORE file names the copy's own
directory, as after a cloned disk or VM image: only the sync server can tell). A real
PostgreSQL reached through both transports (tests/sync/_servers.py).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.pg import PostgresCluster
from tests.sync._helpers import query
from tests.sync._servers import KINDS, Server, missing_on, server_factory
from walsync.engine import Store
from walsync.engine.identity import owner_of, translate_vv
from walsync.sync.merge import record_to_wire
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.restore import restore

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]


@pytest.fixture
def servers(pg_cluster: PostgresCluster) -> Iterator[Callable[[str], Server]]:
    yield from server_factory(pg_cluster)

OPTIONS = ReplicatorOptions(pull_interval_seconds=0.05, batch_wait_seconds=0.001,
                            retry_initial_seconds=0.02, retry_max_seconds=0.3)
ONCE = ReplicatorOptions(pull=False, retry_initial_seconds=0.02, retry_max_seconds=0.3)


COPIES = ["cp", "clone"]


def copy_store(src: Path, dst: Path, how: str) -> None:
    shutil.copytree(src, dst)
    if how == "clone":  # the copy's store believes its directory is the one it was made in
        meta = json.loads((dst / "STORE").read_text())
        meta["directory_inode"] = os.stat(dst).st_ino
        (dst / "STORE").write_text(json.dumps(meta))


def sync_once(store: Store, server: Server, *, pull: bool = False) -> Replicator:
    """One ship (and pull) round, as `walsync sync --once` does."""
    rep = Replicator(store, server.transport(), OPTIONS if pull else ONCE)
    rep.run_once()
    rep.stop()
    return rep


def write(store: Store, prefix: str, values: list[Any]) -> list[int]:
    return [store.put(f"{prefix}/{i}", v).lsn for i, v in enumerate(values)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", COPIES)
def test_copy_whose_original_shipped_on_takes_a_fresh_id_before_its_remote_write_returns(
        tmp_path: Path, servers: Any, kind: str, how: str) -> None:
    server = servers(kind)
    a_dir, copy_dir = tmp_path / "a", tmp_path / "copy"
    with Store.open(a_dir, node_id="A") as a:
        write(a, "k", list(range(5)))
        sync_once(a, server)
    copy_store(a_dir, copy_dir, how)
    with Store.open(a_dir) as a:  # the original goes on, and ships past the copy
        assert write(a, "k", ["original 0", "original 1", "original 2"]) == [6, 7, 8]
        sync_once(a, server)
        assert a.node_id == "A"
    assert server.acked("A") == 8

    with Store.open(copy_dir, remote_timeout_seconds=30) as copy:
        # a cp -r copy knows by its directory, a clone only once the server tells it
        assert copy.node_id == "A"
        assert (copy.copied_from is None) is (how == "clone")
        rep = Replicator(copy, server.transport(), OPTIONS).start()
        try:
            done = copy.put("k/0", "from the copy", durability="remote")
            # it returned: its own entry is on the server (under the copy's new id)
            owner = owner_of(copy.identities, done.lsn).node_id
            assert server.entries().get((owner, done.lsn, "k/0")) == "from the copy"
            assert rep.status().node_renewals == 1
            assert rep.stats().node_renewals == 1
        finally:
            rep.close()
        assert copy.copied_from is None  # its directory is its own now
        assert copy.node_id == owner != "A"
        assert [i.node_id for i in copy.identities] == ["A", owner]
        assert copy.identities[-1].start_lsn == 6  # the copy and the server agree up to 5
        assert missing_on(server, copy) == []

    # the original's writes stay on the server, and it goes on under its id
    held = server.entries()
    assert [held[("A", n, f"k/{n - 6}")] for n in (6, 7, 8)] == [
        "original 0", "original 1", "original 2"]
    with Store.open(a_dir) as a:
        a.put("k/9", "original again")
        sync_once(a, server)
        assert a.node_id == "A"
        assert missing_on(server, a) == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("first", ["original", "copy"])
def test_clones_at_the_same_position_both_ship_every_write(
        tmp_path: Path, servers: Any, kind: str, first: str) -> None:
    """Neither clone's server position is ahead when they diverge: the incarnation the
    server holds decides which one keeps the id; both LSN 6s reach the server, as
    concurrent versions of the key they both wrote."""
    server = servers(kind)
    a_dir, copy_dir = tmp_path / "original", tmp_path / "copy"
    with Store.open(a_dir, node_id="A") as a:
        write(a, "k", list(range(5)))
        sync_once(a, server)
    copy_store(a_dir, copy_dir, "clone")
    with Store.open(a_dir) as a, Store.open(copy_dir) as copy:
        stores = {"original": a, "copy": copy}
        for name, store in stores.items():
            assert store.node_id == "A"
            assert store.put("k/0", f"{name} wrote this").lsn == 6
            assert store.put(f"only/{name}", name).lsn == 7
        order = [first, *(n for n in stores if n != first)]
        for name in order:
            sync_once(stores[name], server)
        assert stores[order[0]].node_id == "A"
        assert stores[order[1]].node_id != "A"
        for name in order:  # both pull the other's writes
            sync_once(stores[name], server, pull=True)
        for store in stores.values():
            assert missing_on(server, store) == []
            assert sorted(v.value for v in store.get_versions("k/0")) == [
                "copy wrote this", "original wrote this"]
            assert store.get("only/original") == "original"
            assert store.get("only/copy") == "copy"
        sibs = {(o, n) for k, o, n in _siblings(server) if k == "k/0"}
        assert sibs == {("A", 6), (stores[order[1]].node_id, 6)}


def _siblings(server: Server) -> list[tuple[str, str, int]]:
    return [(str(k), str(o), int(n)) for k, o, n in
            query(server.dsn, "select key, origin, lsn from walsync.siblings")]


@pytest.mark.parametrize("kind", KINDS)
def test_store_whose_acknowledgement_was_lost_adopts_its_own_entries(
        tmp_path: Path, servers: Any, kind: str) -> None:
    """A crash after the server stored a push and before the store kept the
    acknowledgement: the server is ahead, but with this store's own entries (checked
    by content), so the store keeps its id."""
    server = servers(kind)
    with Store.open(tmp_path / "a", node_id="A") as a:
        write(a, "k", list(range(10)))
        sync_once(a, server)
        a.sync_ledger.set_acked_lsn(4)  # the lost acknowledgement
        a.put("k/10", 10)
        rep = sync_once(a, server)
        assert (a.node_id, rep.status().node_renewals) == ("A", 0)
        assert server.acked("A") == 11
        assert missing_on(server, a) == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lost_node", [True, False], ids=["lost-node", "prefix"])
def test_forced_restore_into_an_existing_store_takes_a_fresh_node_id(
        tmp_path: Path, servers: Any, kind: str, lost_node: bool) -> None:
    server = servers(kind)
    a_dir, old_disk = tmp_path / "a", tmp_path / "old-disk"
    with Store.open(a_dir, node_id="A") as a:
        write(a, "k", list(range(5)))
        sync_once(a, server)
    copy_store(a_dir, old_disk, "clone")  # host A's old disk, kept aside
    with Store.open(a_dir) as a:
        write(a, "later", ["a", "b"])
        sync_once(a, server)
    with Store.open(old_disk) as stale:
        assert stale.node_id == "A"
        stale.put("unshipped", "written on the old disk")  # LSN 6, as A's later/0

    report = restore(server.transport(), old_disk, force=True,
                     **({"lost_node": "A"} if lost_node else {"prefix": "k/"}))
    assert report.node_id != "A"
    assert report.renewed_from == "A"
    with Store.open(old_disk, remote_timeout_seconds=30) as store:
        assert store.node_id == report.node_id
        rep = Replicator(store, server.transport(), OPTIONS).start()
        try:
            done = store.put("after-restore", 1, durability="remote")
            assert server.entries()[(store.node_id, done.lsn, "after-restore")] == 1
        finally:
            rep.close()
        assert missing_on(server, store) == []
        # the old disk's unshipped write is on the server, next to A's own LSN 6
        held = server.entries()
        assert held[(store.node_id, 6, "unshipped")] == "written on the old disk"
        assert held[("A", 6, "later/0")] == "a"
    with Store.open(a_dir) as a:  # A keeps its id and ships on
        a.put("later/2", "c")
        sync_once(a, server)
        assert a.node_id == "A"
        assert missing_on(server, a) == []


@pytest.mark.parametrize("kind", KINDS)
def test_copied_directory_takes_a_fresh_id_before_shipping_a_moved_one_keeps_it(
        tmp_path: Path, servers: Any, kind: str) -> None:
    """A directory that is not the one the store was made in is a copy, whatever the
    server knows (here it never saw the store): its writes after what a server
    confirmed (none: all of them) are relabelled before anything is shipped; the
    original, moved within its file system, keeps its id."""
    server = servers(kind)
    original, moved, copied = tmp_path / "a", tmp_path / "moved", tmp_path / "copied"
    with Store.open(original, node_id="A") as store:
        write(store, "k", ["one", "two"])
    shutil.copytree(original, copied)
    os.rename(original, moved)
    with Store.open(moved) as store:
        assert store.copied_from is None
        sync_once(store, server)
        assert (store.node_id, [i.node_id for i in store.identities]) == ("A", ["A"])
    with Store.open(copied, node_id="A") as store:  # the original name still opens it
        assert store.copied_from is not None
        rep = sync_once(store, server)
        assert rep.status().node_renewals == 1
        new = store.node_id
        assert new.startswith("A.")
        chain = store.identities
        assert [(i.node_id, i.start_lsn) for i in chain] == [("A", 1), (new, 1)]
        assert "is a copy" in chain[-1].reason
        assert {k: (v.origin, v.lsn, dict(v.vv)) for k, v in
                ((k, store.get_version(k)) for k in ("k/0", "k/1")) if v is not None} == {
            "k/0": (new, 1, {new: 1}), "k/1": (new, 2, {new: 2})}
        assert store.copied_from is None
        assert missing_on(server, store) == []
    with Store.open(copied) as store:  # once: the copy's directory is its own now
        sync_once(store, server)
        assert (store.node_id, len(store.identities)) == (new, 2)
    with Store.open(moved) as store:
        assert store.node_id == "A"
        assert missing_on(server, store) == []


def test_renewal_interrupted_before_the_store_file_is_rewritten_rolls_forward(
        tmp_path: Path) -> None:
    """The WAL record that relabels a renewal is its commit point: a crash before the
    STORE file names the new id leaves a store that opens under the new id."""
    path = tmp_path / "a"
    with Store.open(path, node_id="A") as store:
        write(store, "k", list(range(6)))
        before = (path / "STORE").read_bytes()
        new = store.renew_node_id(3, reason="test").node_id
        store.put("k/0", "after")
    (path / "STORE").write_bytes(before)  # as if the rewrite never happened
    with Store.open(path, node_id="A") as store:  # the original name still opens it
        assert store.node_id == new
        assert [i.node_id for i in store.identities] == ["A", new]
        assert store.get_version("k/0").origin == new
        assert {k: (s[0].version.origin, s[0].version.lsn)
                for k, s in store.iter_siblings()} == {
            "k/0": (new, 8), "k/1": ("A", 2), "k/2": ("A", 3), "k/3": (new, 4),
            "k/4": (new, 5), "k/5": (new, 6)}
    assert b'"node_id": "' + new.encode() + b'"' in (path / "STORE").read_bytes()
    with pytest.raises(ValueError, match="already has node id"):
        Store.open(path, node_id="B")


_KILLED_RENEWAL = """
import os, signal, sys
import walsync.engine.storefile
from walsync.engine import Store

write = walsync.engine.storefile.write_store_file

def killed(path, meta):  # SIGKILL as the STORE file would name the new id
    if len(meta.get("identities", [])) > 1:
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, meta)

walsync.engine.storefile.write_store_file = killed
store = Store.open(sys.argv[1])
store.renew_node_id(3, reason="killed")
"""


def test_process_killed_before_the_store_file_names_the_new_id_opens_under_it(
        tmp_path: Path) -> None:
    """A real SIGKILL after the renewal's record is durable, before the STORE file is
    rewritten: the next open replays the record and rolls the STORE file forward."""
    path = tmp_path / "a"
    with Store.open(path, node_id="A") as store:
        write(store, "k", list(range(6)))
    child = subprocess.run([sys.executable, "-c", _KILLED_RENEWAL, str(path)],
                           capture_output=True, text=True, timeout=60,
                           cwd=Path(__file__).resolve().parents[2])
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert json.loads((path / "STORE").read_text())["node_id"] == "A"
    with Store.open(path) as store:
        new = store.node_id
        assert new != "A"
        assert [(i.node_id, i.start_lsn, i.reason) for i in store.identities] == [
            ("A", 1, ""), (new, 4, "killed")]
        assert {k: s[0].version.origin for k, s in store.iter_siblings()} == {
            "k/0": "A", "k/1": "A", "k/2": "A", "k/3": new, "k/4": new, "k/5": new}
    assert json.loads((path / "STORE").read_text())["node_id"] == new


def test_store_1_file_opens_with_one_identity_and_is_written_back_as_store_2(
        tmp_path: Path) -> None:
    path = tmp_path / "a"
    with Store.open(path, node_id="A") as store:
        store.put("k", 1)
    meta = json.loads((path / "STORE").read_text())
    assert meta["format"] == 2
    old = {k: v for k, v in meta.items()
           if k not in ("directory_inode", "identities", "incarnations")}
    (path / "STORE").write_text(json.dumps({**old, "format": 1}))
    with Store.open(path) as store:
        assert [(i.node_id, i.start_lsn) for i in store.identities] == [("A", 1)]
        assert store.copied_from is None  # no directory recorded: none to compare
        store.renew_node_id(1, reason="test")
    meta = json.loads((path / "STORE").read_text())
    assert meta["format"] == 2
    assert [i["node_id"] for i in meta["identities"]][:1] == ["A"]
    assert meta["directory_inode"] == os.stat(path).st_ino


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.tuples(st.just("put"), st.integers(0, 5)),
                          st.tuples(st.just("renew"), st.integers(0, 100))),
                min_size=1, max_size=30))
def test_shipped_dots_are_the_dots_the_store_holds(tmp_path_factory: Any,
                                                   ops: list[tuple[str, int]]) -> None:
    """Over any history of writes and renewals (at any fork the current id allows),
    every WAL record's write, translated as the replicator ships it, is the version the
    snapshot holds for its key while that write is current; and no version the store
    holds claims a dot of a retired id above its fork."""
    path = tmp_path_factory.mktemp("renewals")
    with Store.open(path / "s", node_id="N") as store:
        for op, n in ops:
            if op == "put":
                store.put(f"k/{n}", store.applied_lsn)
            else:
                base = store.identities[-1].base_lsn
                store.renew_node_id(base + n % (store.applied_lsn - base + 1), reason="test")
        chain = store.identities
        current = {k: {(s.version.origin, s.version.lsn): s.version for s in sibs}
                   for k, sibs in store.iter_siblings()}
        for rec in store.wal_reader().read(0, store.applied_lsn, 1 << 20):
            if not rec.local:
                continue
            for e in record_to_wire(rec.lsn, rec.ops):
                origin, vv = translate_vv(chain, rec.lsn, e["vv"])
                assert origin == owner_of(chain, rec.lsn).node_id
                held = current.get(e["key"], {}).get((origin, rec.lsn))
                if held is not None:
                    assert dict(held.vv) == dict(vv)
        for prev, ident in itertools.pairwise(chain):
            for versions in current.values():
                for v in versions.values():
                    assert v.vv.get(prev.node_id, 0) <= ident.base_lsn


@pytest.mark.parametrize("kind", KINDS)
def test_store_synced_before_servers_had_ids_keeps_its_id_and_ships_nothing_again(
        tmp_path: Path, servers: Any, kind: str) -> None:
    """An upgrade: the store knows no server id and no token, its server row no claim,
    and its WAL no longer holds what the server has: nothing is renewed or shipped."""
    server = servers(kind)
    path = tmp_path / "a"
    with Store.open(path, node_id="A", segment_bytes=4096) as store:
        write(store, "k", [{"i": i, "pad": "x" * 100} for i in range(120)])
        sync_once(store, server)
        store.checkpoint()
        oldest = store.wal_reader().oldest_lsn()
        assert oldest is not None
        assert oldest > 100
        store.sync_ledger.set_server_id(None)
    meta = json.loads((path / "STORE").read_text())
    meta.pop("incarnations", None)
    (path / "STORE").write_text(json.dumps(meta))
    query(server.dsn, "update walsync.nodes set incarnation = null returning 1")
    with Store.open(path) as store:
        store.put("k/new", 1)
        rep = sync_once(store, server)
        assert (store.node_id, rep.status().node_renewals, rep.status().reships) == ("A", 0, 0)
        assert rep.status().pushed_entries == 1
        assert server.acked("A") == store.applied_lsn == 121
        assert missing_on(server, store) == []
