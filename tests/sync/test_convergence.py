"""Convergence: any set of entries delivered to any replica in any order, with duplicates,
leaves every replica and the server with the same stored siblings per key (PROTOCOL.md,
Merge rules).

Histories are random: three nodes write the same few keys (puts and deletes), some writes
after partial syncs, so writes are sometimes causally ordered and sometimes concurrent. Then
every entry is delivered to every replica (and to the server) in a random order with
duplicates. Replicas are the pure ``sync.merge.Replica`` (many examples) and real engine
Stores next to the real SQL merge in PostgreSQL, fed through ``PostgresTransport.push``.
Both must end equal to each other and to the set of maximal versions of the history.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.sync._helpers import local_entries, server_siblings, server_winners
from walsync.engine import Store
from walsync.engine.record import CODEC_NONE
from walsync.engine.versions import Sibling, Version, dominates_or_equal, join_vv, winner
from walsync.sync.merge import Replica, sibling_from_wire, sibling_to_wire
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport

NODES = ("A", "B", "C")
KEYS = ("k0", "k1", "k2")

write_op = st.tuples(st.just("write"), st.integers(0, 2), st.integers(0, 2),
                     st.one_of(st.none(), st.integers(0, 2)), st.integers(0, 3))
sync_op = st.tuples(st.just("sync"), st.integers(0, 2), st.integers(0, 2),
                    st.randoms(use_true_random=False), st.floats(0.0, 1.0))
histories = st.lists(st.one_of(write_op, write_op, sync_op), min_size=1, max_size=14)


def maximal(versions: list[Sibling]) -> list[tuple[str, int]]:
    """The dots of the versions no other version strictly dominates: the expected siblings."""
    out = set()
    for v in versions:
        vv = v.version.vv
        if not any(dominates_or_equal(o.version.vv, vv) and not dominates_or_equal(vv, o.version.vv)
                   for o in versions):
            out.add((v.version.origin, v.version.lsn))
    return sorted(out)


def expected_state(log: list[tuple[str, Sibling]]) -> dict[str, list[tuple[str, int]]]:
    by_key: dict[str, list[Sibling]] = {}
    for key, sib in log:
        by_key.setdefault(key, []).append(sib)
    return {k: maximal(v) for k, v in sorted(by_key.items())}


def deliveries(items: list[Any], rnd: random.Random) -> list[Any]:
    """Every item at least once, some twice or three times, in a random order."""
    out = list(items) + [x for x in items if rnd.random() < 0.35] + rnd.sample(
        items, k=min(len(items), rnd.randint(0, 3)))
    rnd.shuffle(out)
    return out


def chunks(items: list[Any], rnd: random.Random, largest: int = 3) -> Iterator[list[Any]]:
    i = 0
    while i < len(items):
        n = rnd.randint(1, largest)
        yield items[i:i + n]
        i += n


# -- the pure replicas ------------------------------------------------------------------


class Node:
    """A replica that also writes: a local write's vv is the join of what it holds for the
    key with its own counter set to the write's LSN (PROTOCOL.md, Merge rules)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lsn = 0
        self.replica = Replica()
        self.log: list[tuple[str, Sibling]] = []

    def write(self, key: str, value: int | None, hlc: int) -> None:
        self.lsn += 1
        vv = join_vv(s.version.vv for s in self.replica.keys.get(key, []))
        vv[self.name] = self.lsn
        data = None if value is None else cbor2.dumps(value)
        sib = Sibling(Version(self.name, self.lsn, hlc, vv, 0, data is None), CODEC_NONE, data)
        self.replica.keys[key] = [sib]
        self.log.append((key, sib))


@settings(max_examples=300, deadline=None)
@given(history=histories, rnd=st.randoms(use_true_random=False))
def test_convergence_pure_replicas_agree_on_siblings_and_winner(
        history: list[Any], rnd: random.Random) -> None:
    nodes = [Node(n) for n in NODES]
    for op in history:
        if op[0] == "write":
            _, n, k, value, hlc = op
            nodes[n].write(KEYS[k], value, hlc)
        else:
            _, src, dst, pick, share = op
            sent = [x for x in nodes[src].log if pick.random() < share]
            for key, sib in deliveries(sent, pick):
                nodes[dst].replica.apply(key, sib)
    log = [x for node in nodes for x in node.log]
    server = Replica()  # the server's rules, by their Python twin
    for replica in [n.replica for n in nodes] + [server]:
        for key, sib in deliveries(log, rnd):
            replica.apply(key, sib)
    want = expected_state(log)
    for replica in [n.replica for n in nodes] + [server]:
        assert replica.canonical() == want
        for key in want:
            best, server_best = replica.winner(key), server.winner(key)
            assert best is not None
            assert server_best is not None
            assert best.version == server_best.version
            assert [s.data for s in replica.visible(key)] == [s.data for s in server.visible(key)]


# -- real stores and the SQL merge ------------------------------------------------------


def _reset_server(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("truncate walsync.entries, walsync.siblings, walsync.nodes, walsync.fenced")
        conn.execute("update walsync.head set pos = 0")
        conn.execute("select setval('walsync.positions', 0)")  # positions from 1 again


def _scratch_root() -> str | None:
    shm = Path("/dev/shm")  # fdatasync is free on tmpfs: the WAL's cost is not under test
    return str(shm) if shm.is_dir() else None


@pytest.mark.postgres
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=histories, rnd=st.randoms(use_true_random=False))
def test_convergence_stores_and_server_agree_on_siblings_and_winner(
        pg_db: str, history: list[Any], rnd: random.Random) -> None:
    # one database for every example: migrate is idempotent, the tables are emptied
    migrate(pg_db)
    _reset_server(pg_db)
    transport = PostgresTransport(pg_db)
    with tempfile.TemporaryDirectory(prefix="walsync-conv-", dir=_scratch_root()) as tmp:
        stores = [Store.open(Path(tmp) / n, node_id=n, durability="none") for n in NODES]
        try:
            for op in history:
                if op[0] == "write":
                    _, n, k, value, _hlc = op
                    if value is None:
                        stores[n].delete(KEYS[k])
                    else:
                        stores[n].put(KEYS[k], value)
                else:
                    _, src, dst, pick, share = op
                    sent = [e for e in local_entries(stores[src]) if pick.random() < share]
                    for batch in chunks(deliveries(sent, pick), pick):
                        stores[dst].apply_remote([(e["key"], sibling_from_wire(e))
                                                  for e in batch])
            entries = [e for s in stores for e in local_entries(s)]
            for store in stores:
                for batch in chunks(deliveries(entries, rnd), rnd):
                    store.apply_remote([(e["key"], sibling_from_wire(e)) for e in batch])
            # the server: batches of one origin's entries (a push names its origin)
            by_origin = {n: [e for e in entries if e["origin"] == n] for n in NODES}
            pushes = [(n, b) for n, es in by_origin.items() for b in chunks(
                deliveries(es, rnd), rnd)]
            rnd.shuffle(pushes)
            for origin, batch in pushes:
                wire = [{k: v for k, v in e.items() if k != "origin"} for e in batch]
                transport.push(origin, 0, wire)

            log = [(e["key"], sibling_from_wire(e)) for e in entries]
            want = expected_state(log)
            assert server_siblings(pg_db) == want
            server_best = server_winners(pg_db)
            for store in stores:
                got = {key: sorted((s.version.origin, s.version.lsn) for s in sibs)
                       for key, sibs in store.iter_siblings()}
                assert got == want, store.node_id
                for key in want:
                    best = winner(sibling for k, sibs in store.iter_siblings() if k == key
                                  for sibling in sibs)
                    assert (best.version.origin, best.version.lsn, best.deleted) == \
                        server_best[key], (store.node_id, key)
                    visible = len(store.get_versions(key))
                    row = [v for k, v in _server_conflicts(pg_db) if k == key]
                    assert (row[0] if row else 1) == visible, (store.node_id, key)
            # every entry the server holds is one of the history's, once
            assert sorted(_server_entry_dots(pg_db)) == sorted(
                (e["origin"], e["lsn"], e["key"]) for e in entries)
        finally:
            for store in stores:
                store.close()
            transport.close()


def _server_conflicts(dsn: str) -> list[tuple[str, int]]:
    with psycopg.connect(dsn) as conn:
        return [(k, int(v)) for k, v in conn.execute(
            "select key, versions from walsync.conflicts").fetchall()]


def _server_entry_dots(dsn: str) -> list[tuple[str, int, str]]:
    with psycopg.connect(dsn) as conn:
        return [(o, int(n), k) for o, n, k in conn.execute(
            "select origin, lsn, key from walsync.entries").fetchall()]


def test_convergence_wire_round_trip_keeps_versions() -> None:
    """The wire form (what both transports carry) keeps every field merging depends on."""
    vv = {"A": 3, "B": 7}
    for data in (cbor2.dumps({"x": [1, 2]}), None):
        sib = Sibling(Version("B", 7, 123 << 16, vv, 2, data is None), CODEC_NONE, data)
        wire = {**sibling_to_wire("k", 0, sib), "origin": "B"}
        assert sibling_from_wire(wire) == sib
