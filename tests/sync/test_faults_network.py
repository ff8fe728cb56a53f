"""Network faults between the replicator's postgres transport and the database
(SPEC 7: dropped connections, delays, torn messages and a server restart lose nothing and
duplicate nothing). The faults come from tests/sync/_proxy.py, a loopback TCP proxy.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import Store
from engine.errors import RemoteUnavailableError, SyncError
from sync.migrate import migrate
from sync.postgres import PostgresTransport
from sync.replicator import Replicator, ReplicatorOptions
from tests.pg import PostgresCluster
from tests.sync._helpers import entry, query, server_entry_ids, wait_for, with_port
from tests.sync._proxy import FaultProxy

pytestmark = pytest.mark.postgres

OPTIONS = ReplicatorOptions(pull_interval_seconds=0.05, batch_records=200,
                            batch_wait_seconds=0.002, retry_initial_seconds=0.02,
                            retry_max_seconds=0.25)


@pytest.fixture
def proxy(pg_cluster: PostgresCluster, pg_db: str) -> Iterator[FaultProxy]:
    migrate(pg_db)
    p = FaultProxy(pg_cluster.port).start()
    try:
        yield p
    finally:
        p.stop()


def _transport(pg_db: str, proxy: FaultProxy) -> PostgresTransport:
    return PostgresTransport(with_port(pg_db, proxy.port), timeout_seconds=5,
                             connect_timeout_seconds=2)


def _call_until_ok(t: PostgresTransport, fn: str, args: dict[str, object]) -> object:
    """A caller's retry: the first call after a fault may find its connection dead."""
    for _ in range(5):
        try:
            return t.call(fn, args)
        except RemoteUnavailableError:
            continue
    raise AssertionError(f"{fn} kept failing")


def test_proxy_faults_surface_as_unavailable_and_the_transport_recovers(
        pg_db: str, proxy: FaultProxy) -> None:
    t = _transport(pg_db, proxy)
    try:
        assert t.head() == 0
        assert proxy.open_connections == 1

        proxy.reset_all()  # a dropped connection
        with pytest.raises(RemoteUnavailableError):
            t.head()
        assert t.head() == 0  # reconnects

        proxy.truncate_next(7)  # a response torn mid-message
        with pytest.raises(RemoteUnavailableError):
            t.push("A", 1, [entry("A", 1, "k", 1)])
        # the torn push may or may not have committed; re-sending is harmless either way
        ack = _call_until_ok(t, "push", {"p_node": "A", "p_through_lsn": 1,
                                         "p_entries": [entry("A", 1, "k", 1)]})
        assert isinstance(ack, dict)
        assert ack["acked_lsn"] == 1

        proxy.truncate_next(3, to_client=False)  # a request torn mid-message
        with pytest.raises(RemoteUnavailableError):
            t.push("A", 2, [entry("A", 2, "k", 2, {"A": 2})])
        _call_until_ok(t, "push", {"p_node": "A", "p_through_lsn": 2,
                                   "p_entries": [entry("A", 2, "k", 2, {"A": 2})]})

        proxy.refuse = True  # the server looks down
        with pytest.raises(RemoteUnavailableError, match=r"cannot reach|connection"):
            t.head()
        with pytest.raises(RemoteUnavailableError):
            t.head()
        proxy.refuse = False

        proxy.delay_seconds = 0.05  # slow, but fine
        started = time.monotonic()
        assert _call_until_ok(t, "head", {}) == {"head": 2, "schema_version": 1}
        assert time.monotonic() - started >= 0.05
        proxy.delay_seconds = 0.0
    finally:
        t.close()
    assert sorted(server_entry_ids(pg_db)) == [("A", 1, "k"), ("A", 2, "k")]
    assert query(pg_db, "select pos from walsync.head") == [(2,)]


def test_faults_network_replication_survives_resets_delays_and_a_restart(
        tmp_path: Path, pg_db: str, pg_cluster: PostgresCluster, proxy: FaultProxy) -> None:
    rnd = random.Random(20261123)
    total = 2000
    a = Store.open(tmp_path / "A", node_id="A", segment_bytes=64 * 1024)
    b = Store.open(tmp_path / "B", node_id="B")
    ra = Replicator(a, _transport(pg_db, proxy), OPTIONS).start()
    rb = Replicator(b, _transport(pg_db, proxy), OPTIONS).start()
    committed: set[tuple[str, int, str]] = set()
    stop = threading.Event()
    restarted = threading.Event()
    chaos_log: list[str] = []

    def chaos() -> None:
        while not stop.is_set():
            stop.wait(rnd.uniform(0.02, 0.08))
            roll = rnd.random()
            if roll < 0.5:
                proxy.reset_all()
                chaos_log.append("reset")
            elif roll < 0.65:
                proxy.delay_seconds = rnd.uniform(0.002, 0.02)
                stop.wait(0.1)
                proxy.delay_seconds = 0.0
                chaos_log.append("delay")
            elif roll < 0.8:
                proxy.truncate_next(rnd.randint(0, 300), to_client=rnd.random() < 0.7)
                chaos_log.append("truncate")
            else:
                proxy.refuse = True
                stop.wait(rnd.uniform(0.05, 0.2))
                proxy.refuse = False
                chaos_log.append("refuse")
            if len(committed) > total * 0.4 and not restarted.is_set():
                pg_cluster.restart()
                restarted.set()
                chaos_log.append("restart")

    troublemaker = threading.Thread(target=chaos, daemon=True)
    troublemaker.start()
    try:
        i = 0
        while i < total:
            if i % 10 == 0:  # a record of three keys now and then
                with a.batch() as batch:
                    for j in range(3):
                        batch.put(f"multi/{i}/{j}", {"i": i, "j": j})
                lsn = a.applied_lsn
                committed |= {("A", lsn, f"multi/{i}/{j}") for j in range(3)}
            else:
                key = f"k{rnd.randrange(500)}"  # overwrites too
                committed.add(("A", a.put(key, {"i": i}).lsn, key))
            i += 1
            time.sleep(0.001)  # ~3 s of traffic: time for dozens of faults
        wait_for(restarted.is_set, timeout=30, what="the database restart")
    finally:
        stop.set()
        troublemaker.join(timeout=60)
        proxy.refuse = False
        proxy.delay_seconds = 0.0
    try:
        assert {"reset", "restart"} <= set(chaos_log), chaos_log
        wait_for(lambda: ra.error is None and ra.status().lag_entries == 0, timeout=60,
                 what=f"A's lag back to 0 ({ra.status()})")
        assert ra.status().retries > 0
        summary = {k: chaos_log.count(k) for k in set(chaos_log)}
        assert len(chaos_log) >= 10, summary  # dozens of faults while the commits flowed
        assert proxy.resets >= 10, (proxy.resets, summary)
        # exactly the committed entries: nothing lost, nothing twice
        rows = server_entry_ids(pg_db)
        assert len(rows) == len(set(rows)) == len(committed)
        assert set(rows) == committed
        assert query(pg_db, "select count(*), max(pos) from walsync.entries") == [
            (len(committed), len(committed))]
        assert query(pg_db, "select acked_lsn from walsync.nodes where node_id = 'A'") == [
            (a.applied_lsn,)]
        # and the puller behind the same faults converged on the same state
        wait_for(lambda: rb.error is None and rb.status().pull_cursor == len(committed),
                 timeout=60, what="B caught up")
        assert dict(b.scan()) == dict(a.scan())
        assert rb.error is None
        assert ra.error is None
    finally:
        for rep in (ra, rb):
            rep.close()
        a.close()
        b.close()


def test_faults_network_sync_errors_never_leak_the_password(
        pg_db: str, proxy: FaultProxy) -> None:
    secret = "pw-over-the-proxy-5b1e"
    t = PostgresTransport(with_port(pg_db, proxy.port) + f" password={secret}",
                          connect_timeout_seconds=2)
    try:
        assert t.head() == 0
        errors: list[SyncError] = []
        for fault in ("reset", "truncate", "refuse"):
            if fault == "reset":
                proxy.reset_all()
            elif fault == "truncate":
                proxy.truncate_next(5)
            else:
                proxy.refuse = True
            with pytest.raises(SyncError) as info:
                t.head()
            errors.append(info.value)
            proxy.refuse = False
            _call_until_ok(t, "head", {})
        for err in errors:
            assert isinstance(err, RemoteUnavailableError)
            assert secret not in str(err)
            assert secret not in repr(err)
    finally:
        t.close()
