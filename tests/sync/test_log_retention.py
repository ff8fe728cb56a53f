"""The entry log's retention on a real PostgreSQL, through both transports: compaction
runs one caller at a time (a server-side lock), a store that fell behind a collected
tombstone is refused and its replicator re-bootstraps, and the sync worker's compactor
calls the server on its own thread."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from tests.gateway import PostgrestGateway
from tests.sync._helpers import supabase_transport, wait_for
from walsync.engine import Store
from walsync.sync.logretention import Compactor
from walsync.sync.memory import MemoryServer
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.scope import Scope
from walsync.sync.transport import Transport

ONCE = ReplicatorOptions(pull_interval_seconds=0, batch_wait_seconds=0, pull_limit=5,
                         retry_initial_seconds=0.001, retry_max_seconds=0.01)


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("supabase", marks=pytest.mark.postgres)])
def connect(request: pytest.FixtureRequest, pg_db: str) -> Iterator[Callable[[], Transport]]:
    migrate(pg_db)
    opened: list[Transport] = []
    gateway: PostgrestGateway | None = None
    if request.param == "supabase":
        gateway = request.getfixturevalue("pg_gateway")(schemas=["walsync_api"])

    def make() -> Transport:
        t: Transport = (PostgresTransport(pg_db, timeout_seconds=30) if gateway is None
                        else supabase_transport(gateway))
        opened.append(t)
        return t

    try:
        yield make
    finally:
        for t in opened:
            t.close()


def test_log_retention_compaction_runs_one_caller_at_a_time(
        connect: Callable[[], Transport], pg_db: str) -> None:
    t = connect()
    with psycopg.connect(pg_db) as conn, conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext('walsync.compact_log'), "
                     "hashtext(''))")
        busy = t.compact_log()
        assert (busy.ran, busy.removed_entries, busy.collected_tombstones) == (False, 0, 0)
    assert t.compact_log().ran is True


def test_log_retention_a_store_behind_a_collected_tombstone_rebootstraps(
        connect: Callable[[], Transport], tmp_path: Path) -> None:
    admin = connect()
    a = Store.open(tmp_path / "a", node_id="A")
    b = Store.open(tmp_path / "b", node_id="B")
    ra = Replicator(a, connect(), ReplicatorOptions(pull=False, batch_wait_seconds=0))
    rb = Replicator(b, connect(), ONCE, scope=Scope(prefixes=("k/",)))
    try:
        for i in range(12):
            a.put(f"k/{i}", i)
        a.put("k/doomed", "x")
        ra.run_once()
        rb.run_once()
        assert b.get("k/doomed") == "x"
        behind = rb.status().pull_cursor
        a.delete("k/doomed")
        a.put("k/0", "again")
        a.put("k/late", 1)
        ra.run_once()
        # a window shorter than B's absence: nobody pulled within it, every entry is older
        admin.log_retention(0.001)
        time.sleep(0.05)
        run = admin.compact_log()
        assert run.collected_tombstones == 1
        assert run.gc_through > behind
        rb.run_once()
        assert rb.status().extra["rebootstraps"] == 1
        assert (b.get("k/0"), b.get("k/late"), b.get("k/doomed")) == ("again", 1, None)
        assert rb.status().pull_cursor >= run.gc_through
        a.put("k/after", 2)
        ra.run_once()
        rb.run_once()
        assert b.get("k/after") == 2
        assert rb.status().extra["rebootstraps"] == 1
    finally:
        ra.close()
        rb.close()
        a.close()
        b.close()


def test_log_retention_compactor_calls_the_server_until_stopped() -> None:
    server = MemoryServer()
    compactor = Compactor(server.transport, 0.02).start()
    try:
        wait_for(lambda: compactor.runs >= 3, timeout=10, what="three compactions")
        assert compactor.last is not None
        assert compactor.last.ran is True
    finally:
        compactor.stop()
    runs = compactor.runs
    time.sleep(0.1)
    assert compactor.runs == runs
    server.stop()  # a failing server: logged, tried again, never raised
    failing = Compactor(server.transport, 0.02).start()
    try:
        wait_for(lambda: failing.last_error is not None, timeout=10, what="an error kept")
    finally:
        failing.stop()
    with pytest.raises(ValueError, match="positive"):
        Compactor(server.transport, 0)
