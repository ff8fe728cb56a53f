"""The replicator between real Stores and a real PostgreSQL (sync/replicator.py).

Two stores (nodes A and B) replicate through one database: writes, deletes and conflicts
travel both ways; merge records are never shipped back; the acknowledged LSN is persisted
and holds the WAL; restarts and lost acknowledgements duplicate nothing; a store used
before sync is bootstrapped; durability 'remote' waits for the server; permanent errors
stop the replicator and keep every entry; transient errors are retried.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.gateway import PostgrestGateway
from tests.pg import PostgresCluster
from tests.sync._helpers import (
    local_entries,
    query,
    server_entry_ids,
    server_siblings,
    server_winners,
    store_siblings,
    store_winners,
    supabase_transport,
    wait_for,
)
from walsync.engine import Store
from walsync.engine.errors import (
    RemoteDurabilityTimeoutError,
    RemoteSchemaError,
    ReplicatorStoppedError,
)
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions

pytestmark = pytest.mark.postgres

FAST = ReplicatorOptions(pull_interval_seconds=0.05, batch_wait_seconds=0.001,
                         retry_initial_seconds=0.02, retry_max_seconds=0.3)
NO_PULL = ReplicatorOptions(pull=False, retry_initial_seconds=0.02, retry_max_seconds=0.3)


class Nodes:
    """Stores under tmp_path and their replicators; everything is closed at the end."""

    def __init__(self, root: Path, dsn: str) -> None:
        self.root = root
        self.dsn = dsn
        self.stores: list[Store] = []
        self.replicators: list[Replicator] = []

    def open(self, name: str, **options: Any) -> Store:
        store = Store.open(self.root / name, node_id=name, **options)
        self.stores.append(store)
        return store

    def replicator(self, store: Store, options: ReplicatorOptions = FAST, *,
                   start: bool = True, dsn: str | None = None) -> Replicator:
        rep = Replicator(store, PostgresTransport(dsn or self.dsn, timeout_seconds=10,
                                                  connect_timeout_seconds=3), options)
        self.replicators.append(rep)
        return rep.start() if start else rep

    def stop(self, rep: Replicator) -> None:
        rep.close()
        self.replicators.remove(rep)

    def close(self, store: Store) -> None:
        for rep in [r for r in self.replicators if r.store is store]:
            self.stop(rep)
        store.close()
        self.stores.remove(store)

    def close_all(self) -> None:
        for rep in list(self.replicators):
            self.stop(rep)
        for store in list(self.stores):
            store.close()
        self.stores.clear()


@pytest.fixture
def nodes(tmp_path: Path, pg_db: str) -> Iterator[Nodes]:
    migrate(pg_db)
    n = Nodes(tmp_path, pg_db)
    try:
        yield n
    finally:
        n.close_all()


def caught_up(*pairs: tuple[Store, Replicator]) -> bool:
    return all(rep.error is None and rep.status().lag_entries == 0 for _, rep in pairs)


def converged(dsn: str, *stores: Store) -> bool:
    server = server_siblings(dsn)
    return all(store_siblings(s) == server for s in stores)


def entry_count(dsn: str) -> int:
    return int(query(dsn, "select count(*) from walsync.entries")[0][0])


def acked_on_server(dsn: str, node: str) -> int:
    rows = query(dsn, "select acked_lsn from walsync.nodes where node_id = %s", (node,))
    return int(rows[0][0]) if rows else 0


# -- both ways ---------------------------------------------------------------------------


def test_replicator_writes_and_deletes_reach_the_other_node(nodes: Nodes) -> None:
    a, b = nodes.open("A"), nodes.open("B")
    ra, rb = nodes.replicator(a), nodes.replicator(b)
    a.put("from-a", {"n": 1})
    b.put("from-b", [1, 2, 3])
    with a.batch() as batch:
        batch.put("pair/1", "one")
        batch.put("pair/2", "two")
    wait_for(lambda: b.get("from-a") == {"n": 1} and b.get("pair/2") == "two", what="A -> B")
    wait_for(lambda: a.get("from-b") == [1, 2, 3], what="B -> A")

    b.delete("from-a")  # a delete of the other node's key
    wait_for(lambda: a.get("from-a") is None, what="delete B -> A")
    a.put("from-b", "overwritten on A")
    wait_for(lambda: b.get("from-b") == "overwritten on A", what="overwrite A -> B")

    wait_for(lambda: caught_up((a, ra), (b, rb)) and converged(nodes.dsn, a, b),
             what="both nodes and the server converged")
    winners = server_winners(nodes.dsn)
    assert winners["from-a"][0] == "B"  # B's tombstone
    assert winners["from-a"][2] is True
    assert winners == store_winners(a) == store_winners(b)
    assert dict(a.scan()) == dict(b.scan()) == {
        "from-b": "overwritten on A", "pair/1": "one", "pair/2": "two"}
    assert ra.status().pulled_entries >= 1
    assert rb.status().pulled_entries >= 4


def test_replicator_concurrent_writes_become_siblings_then_a_write_resolves_them(
        nodes: Nodes) -> None:
    a, b = nodes.open("A"), nodes.open("B")
    a.put("doc", {"by": "A"})  # neither has seen the other's write: concurrent
    b.put("doc", {"by": "B"})
    ra, rb = nodes.replicator(a), nodes.replicator(b)

    def split_everywhere() -> bool:
        server = server_siblings(nodes.dsn).get("doc", [])
        return (len(a.get_versions("doc")) == 2 and len(b.get_versions("doc")) == 2
                and server == [("A", 1), ("B", 1)])

    wait_for(split_everywhere, what="siblings on A, B and the server")
    assert a.get("doc") == b.get("doc")  # the same deterministic winner everywhere
    winner = server_winners(nodes.dsn)["doc"]
    version = a.get_version("doc")
    assert version is not None
    assert (version.origin, version.lsn) == winner[:2]
    assert query(nodes.dsn, "select key, versions from walsync.conflicts") == [("doc", 2)]
    wait_for(lambda: ra.status().conflicts + rb.status().conflicts >= 1, what="conflict count")

    resolved = a.put("doc", {"by": "both"})
    wait_for(lambda: [v.value for v in b.get_versions("doc")] == [{"by": "both"}],
             what="the resolution reaching B")
    wait_for(lambda: server_siblings(nodes.dsn)["doc"] == [("A", resolved.lsn)],
             what="the resolution on the server")
    assert [v.value for v in a.get_versions("doc")] == [{"by": "both"}]
    assert query(nodes.dsn, "select count(*) from walsync.conflicts") == [(0,)]


def test_replicator_never_ships_pulled_merge_records(nodes: Nodes) -> None:
    a, b = nodes.open("A"), nodes.open("B")
    ra, rb = nodes.replicator(a), nodes.replicator(b)
    for i in range(20):
        (a if i % 2 else b).put(f"k{i % 5}", i)
        time.sleep(0.01)
    wait_for(lambda: caught_up((a, ra), (b, rb)) and converged(nodes.dsn, a, b),
             what="convergence")
    time.sleep(0.2)  # a few more pull rounds: still nothing shipped back
    assert caught_up((a, ra), (b, rb))
    # B applied A's records as merge records (and A B's): the server holds only the
    # records each node wrote itself, under its own name, once
    server = sorted(server_entry_ids(nodes.dsn))
    own = sorted((e["origin"], e["lsn"], e["key"]) for s in (a, b) for e in local_entries(s))
    assert server == own
    assert len(own) == 20
    assert a.applied_lsn > 10  # A's WAL holds merge records too
    assert b.applied_lsn > 10
    for origin, lsn, vv in query(nodes.dsn, "select origin, lsn, vv from walsync.entries"):
        assert vv[origin] == lsn  # a node's own write: its own counter is the LSN


# -- acknowledgement, retention, restarts ------------------------------------------------


def test_replicator_acked_lsn_is_persisted_and_is_the_retain_floor(nodes: Nodes) -> None:
    a = nodes.open("A", segment_bytes=4096)
    rep = nodes.replicator(a, NO_PULL, start=False)
    rep.run_once()
    assert a.retain_floor == 1
    for i in range(60):
        a.put(f"k{i}", "x" * 300)
    assert a.info().segments > 3
    a.checkpoint()  # nothing is acknowledged: every record stays
    assert a.wal_reader().oldest_lsn() == 1
    assert rep.run_once() == (60, 0)
    assert rep.acked_lsn == 60
    assert a.retain_floor == 61
    assert a.sync_ledger.acked_lsn == 60
    assert a.checkpoint().segments_removed > 0  # acknowledged segments may go now
    for i in range(60, 90):
        a.put(f"k{i}", "y" * 300)
    a.checkpoint()
    oldest = a.wal_reader().oldest_lsn()
    assert oldest is not None
    assert oldest <= 61  # the unacknowledged records 61..90 are all still in the WAL
    assert [r.lsn for r in a.wal_reader().read(60, 90, 100)] == list(range(61, 91))
    nodes.close(a)

    a = nodes.open("A", segment_bytes=4096)
    assert a.sync_ledger.acked_lsn == 60
    assert a.retain_floor == 61
    rep = nodes.replicator(a, NO_PULL, start=False)
    assert rep.acked_lsn == 60
    assert rep.run_once() == (30, 0)
    assert (rep.acked_lsn, acked_on_server(nodes.dsn, "A"), entry_count(nodes.dsn)) == (90, 90, 90)


def test_replicator_restarted_after_a_crash_reships_nothing_and_duplicates_nothing(
        nodes: Nodes) -> None:
    a = nodes.open("A")
    rep = nodes.replicator(a, NO_PULL)
    for i in range(40):
        if i % 4 == 0:
            with a.batch() as batch:
                batch.put(f"k{i}", i)
                batch.put(f"k{i}/extra", -i)
        else:
            a.put(f"k{i % 7}", i)
    wait_for(lambda: caught_up((a, rep)), what="A acknowledged")
    rows = entry_count(nodes.dsn)
    head = query(nodes.dsn, "select pos from walsync.head")[0][0]
    assert rows == 50

    # crash 1: the local record of the acknowledgement was lost (not yet synced)
    nodes.stop(rep)
    a.sync_ledger.set_acked_lsn(12)
    nodes.close(a)
    a = nodes.open("A")
    rep = nodes.replicator(a, NO_PULL, start=False)
    assert rep.acked_lsn == 12
    assert rep.run_once() == (0, 0)  # the server's acknowledgement wins: nothing re-sent
    assert rep.acked_lsn == 40
    assert a.sync_ledger.acked_lsn == 40

    # crash 2: the server committed pushes whose acknowledgement never arrived
    nodes.stop(rep)
    a.sync_ledger.set_acked_lsn(20)
    nodes.close(a)
    with psycopg.connect(nodes.dsn, autocommit=True) as conn:
        conn.execute("update walsync.nodes set acked_lsn = 20 where node_id = 'A'")
    a = nodes.open("A")
    rep = nodes.replicator(a, NO_PULL, start=False)
    pushed, _ = rep.run_once()
    assert pushed > 0  # records 21..40 went again (at least once) ...
    assert entry_count(nodes.dsn) == rows  # ... with no effect (exactly once)
    assert query(nodes.dsn, "select pos from walsync.head")[0][0] == head
    assert (rep.acked_lsn, acked_on_server(nodes.dsn, "A")) == (40, 40)

    # and it goes on normally
    a.put("after", 1)
    assert rep.run_once() == (1, 0)
    assert entry_count(nodes.dsn) == rows + 1


def test_replicator_bootstraps_a_store_whose_wal_was_already_removed(nodes: Nodes) -> None:
    a = nodes.open("A", segment_bytes=4096)
    for i in range(80):
        a.put(f"k{i:02d}", {"i": i, "pad": "p" * 200})
    for i in range(0, 80, 4):
        a.put(f"k{i:02d}", {"i": i, "again": True})
    for i in range(1, 80, 8):
        a.delete(f"k{i:02d}")
    a.checkpoint()  # used without sync: no retention floor, old segments are removed
    oldest = a.wal_reader().oldest_lsn()
    assert oldest is not None
    assert oldest > 50

    rep = nodes.replicator(a, NO_PULL, start=False)
    rep.run_once()
    assert rep.acked_lsn == a.applied_lsn
    assert acked_on_server(nodes.dsn, "A") == a.applied_lsn
    assert server_siblings(nodes.dsn) == store_siblings(a)
    assert server_winners(nodes.dsn) == store_winners(a)
    live = {k for k, (_, _, deleted) in server_winners(nodes.dsn).items() if not deleted}
    assert live == set(a.keys())
    assert len(live) == 70

    a.put("later", 1)  # and then from the log, as usual
    assert rep.run_once() == (1, 0)
    assert ("A", a.applied_lsn, "later") in server_entry_ids(nodes.dsn)

    # a second node pulls the bootstrapped state like any other
    b = nodes.open("B")
    rb = nodes.replicator(b)
    wait_for(lambda: caught_up((b, rb)) and store_siblings(b) == server_siblings(nodes.dsn),
             what="B pulled A's bootstrapped state")
    assert dict(b.scan()) == dict(a.scan())


# -- durability 'remote' -----------------------------------------------------------------


def test_replicator_remote_durability_returns_after_the_server_has_the_entry(
        nodes: Nodes) -> None:
    a = nodes.open("A")
    rep = nodes.replicator(a, NO_PULL)
    for i in range(5):
        result = a.put(f"k{i}", i, durability="remote")
        # no waiting here: the server holds it when the call returns
        assert ("A", result.lsn, f"k{i}") in server_entry_ids(nodes.dsn)
        assert acked_on_server(nodes.dsn, "A") >= result.lsn
        assert rep.acked_lsn >= result.lsn


def test_replicator_remote_durability_times_out_while_the_server_is_down(
        nodes: Nodes, pg_cluster: PostgresCluster) -> None:
    a = nodes.open("A", remote_timeout_seconds=1.0)
    rep = nodes.replicator(a, NO_PULL)
    a.put("warm", 0, durability="remote")
    pg_cluster.stop()
    try:
        started = time.monotonic()
        with pytest.raises(RemoteDurabilityTimeoutError) as info:
            a.put("k", "committed while the server was down", durability="remote")
        assert 0.9 <= time.monotonic() - started < 5
        assert "durable locally" in str(info.value)
        assert info.value.lsn == 2
        assert a.get("k") == "committed while the server was down"  # it is committed
        wait_for(lambda: rep.status().retries > 0, what="retries")
        status = rep.status()
        assert rep.error is None  # transient: still trying
        assert status.stopped_reason is None
        assert status.lag_entries == 1
        assert status.last_error is not None
    finally:
        pg_cluster.start()
    wait_for(lambda: ("A", 2, "k") in server_entry_ids(nodes.dsn), timeout=30,
             what="the entry after the restart")
    wait_for(lambda: rep.status().lag_entries == 0, what="lag back to 0")
    assert a.put("after", 1, durability="remote").lsn == 3


# -- faults ------------------------------------------------------------------------------


def test_replicator_permanent_error_stops_it_and_keeps_every_entry_in_the_wal(
        nodes: Nodes) -> None:
    a = nodes.open("A", segment_bytes=4096)
    rep = nodes.replicator(a, FAST)
    for i in range(5):
        a.put(f"k{i}", i)
    wait_for(lambda: caught_up((a, rep)), what="first entries acknowledged")
    with psycopg.connect(nodes.dsn, autocommit=True) as conn:
        conn.execute("drop schema walsync_api cascade")
    for i in range(5, 40):
        a.put(f"k{i}", "z" * 300)
    wait_for(lambda: rep.error is not None, what="the replicator to stop")
    assert isinstance(rep.error, RemoteSchemaError)
    status = rep.status()
    assert not status.running
    assert status.stopped_reason is not None
    assert "walsync_api" in status.stopped_reason
    assert status.acked_lsn == 5
    assert status.lag_entries == 35
    retries = status.retries
    time.sleep(0.3)
    assert rep.status().retries == retries  # stopped: no retry loop on a permanent error
    started = time.monotonic()  # a 'remote' commit does not wait out its timeout
    with pytest.raises(ReplicatorStoppedError, match="durable locally") as info:
        a.put("k40", "z", durability="remote")
    assert time.monotonic() - started < 2
    assert isinstance(info.value.__cause__, RemoteSchemaError)
    a.checkpoint()
    assert [r.lsn for r in a.wal_reader().read(5, a.applied_lsn, 1000)] == list(range(6, 42))
    assert entry_count(nodes.dsn) == 5

    # `walsync migrate` repairs the server; a new replicator ships everything kept
    nodes.stop(rep)
    migrate(nodes.dsn)
    rep = nodes.replicator(a, FAST)
    wait_for(lambda: caught_up((a, rep)), what="the kept entries shipped")
    assert entry_count(nodes.dsn) == 41
    assert sorted(server_entry_ids(nodes.dsn)) == sorted(
        ("A", i + 1, f"k{i}") for i in range(41))


def _terminate_other_backends(dsn: str) -> int:
    rows = query(dsn, "select count(pg_terminate_backend(pid)) from pg_stat_activity "
                      "where datname = current_database() and pid <> pg_backend_pid() "
                      "and backend_type = 'client backend'")
    return int(rows[0][0])


def test_replicator_retries_transient_errors_and_lag_recovers(nodes: Nodes) -> None:
    a, b = nodes.open("A"), nodes.open("B")
    ra, rb = nodes.replicator(a), nodes.replicator(b)
    a.put("warm", 0)
    wait_for(lambda: caught_up((a, ra), (b, rb)) and b.get("warm") == 0, what="warm-up")
    stop = threading.Event()
    killed: list[int] = []

    def cut_connections() -> None:
        while not stop.is_set():
            killed.append(_terminate_other_backends(nodes.dsn))
            stop.wait(0.05)

    cutter = threading.Thread(target=cut_connections, daemon=True)
    cutter.start()
    try:
        for i in range(150):
            a.put(f"a{i}", i)
            if i % 3 == 0:
                b.put(f"b{i}", i)
            time.sleep(0.002)
    finally:
        stop.set()
        cutter.join()
    assert sum(killed) > 0
    wait_for(lambda: ra.status().retries + rb.status().retries > 0, what="retries")
    wait_for(lambda: caught_up((a, ra), (b, rb)) and converged(nodes.dsn, a, b), timeout=30,
             what="lag back to 0 and convergence")
    assert ra.error is None
    assert rb.error is None
    assert entry_count(nodes.dsn) == 1 + 150 + 50
    assert b.get("a149") == 149
    assert a.get("b147") == 147


def test_replicator_status_reports_lag_and_cursor(nodes: Nodes) -> None:
    a = nodes.open("A")
    rep = nodes.replicator(a, NO_PULL, start=False)
    for i in range(4):
        a.put(f"k{i}", i)
    status = rep.status()
    assert (status.node_id, status.transport, status.running) == ("A", "postgres", False)
    assert (status.acked_lsn, status.applied_lsn, status.lag_entries) == (0, 4, 4)
    assert status.lag_bytes > 0
    rep.run_once()
    status = rep.status()
    assert (status.acked_lsn, status.lag_entries, status.lag_bytes, status.pushed_entries) == (
        4, 0, 0, 4)
    assert status.server_head == 4
    assert status.last_push_at is not None

    b = nodes.open("B")
    rb = nodes.replicator(b, FAST, start=False)
    assert rb.run_once() == (0, 4)
    assert rb.status().pull_cursor == 4
    assert rb.status().pulled_entries == 4
    assert query(nodes.dsn, "select pull_cursor from walsync.nodes where node_id = 'B'") == [(0,)]
    rb.pull()  # confirms the cursor it now holds
    assert query(nodes.dsn, "select pull_cursor from walsync.nodes where node_id = 'B'") == [(4,)]



def test_replicator_over_the_supabase_transport_converges_with_a_postgres_node(
        nodes: Nodes, pg_gateway: Callable[..., PostgrestGateway]) -> None:
    """A replicator speaking supabase-py (RPC through PostgREST) and one speaking psycopg
    exchange every kind of value: compressed, binary, nested, deleted."""
    gateway = pg_gateway(schemas=["walsync_api"])
    a, b = nodes.open("A"), nodes.open("B")
    ra = Replicator(a, supabase_transport(gateway), FAST).start()
    nodes.replicators.append(ra)
    rb = nodes.replicator(b)
    big = {"text": "walsync " * 2000}  # above compress_above_bytes: stored zstd-compressed
    a.put("big", big)
    a.put("bytes", b"\x00\x01binary\xff")
    a.put("nested", {"list": [1, 2.5, None, True], "map": {"x": "y"}})
    b.put("from-b", "hello")
    a.put("gone", 1)
    a.delete("gone")
    wait_for(lambda: caught_up((a, ra), (b, rb)) and converged(nodes.dsn, a, b)
             and b.get("nested") is not None and a.get("from-b") == "hello",
             what="convergence across transports")
    assert b.get("big") == big
    assert b.get("bytes") == b"\x00\x01binary\xff"
    assert b.get("nested") == {"list": [1, 2.5, None, True], "map": {"x": "y"}}
    assert b.get("gone") is None
    assert store_winners(b) == server_winners(nodes.dsn)
    # the table-editor view: JSON where the value has a JSON form
    view = dict(query(nodes.dsn, "select key, value from walsync.state_json"))
    assert view["nested"] == {"list": [1, 2.5, None, True], "map": {"x": "y"}}
    assert view["from-b"] == "hello"
    assert view["bytes"] is None
    assert "gone" not in view
    assert query(nodes.dsn, "select codec from walsync.siblings where key = 'big'") == [(1,)]
