"""Durability 'remote' (README: replication): a commit returns once the server has it, or raises a
timeout saying it is durable locally but not yet replicated, and the replicator
delivers it once the server is back. Real PostgreSQL, stopped and started."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest

from tests.pg import PostgresCluster
from tests.sync._hostloss_child import one
from walsync.engine import Store
from walsync.engine.errors import DurabilityError, RemoteDurabilityTimeoutError
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions

pytestmark = [pytest.mark.postgres, pytest.mark.crash, pytest.mark.timeout(90)]

REMOTE_TIMEOUT_SECONDS = 2.0


def entry_rows(dsn: str, node: str, lsn: int) -> list[tuple[str, bool]]:
    with psycopg.connect(dsn) as conn:
        return [(k, d) for k, d in conn.execute(
            "select key, deleted from walsync.entries where origin = %s and lsn = %s",
            (node, lsn))]


def test_remote_commit_is_on_the_server_or_says_it_is_not(
    pg_cluster: PostgresCluster, pg_db: str, tmp_path: Path
) -> None:
    migrate(pg_db)
    store = Store.open(tmp_path / "s", remote_timeout_seconds=REMOTE_TIMEOUT_SECONDS)
    node = store.node_id
    rep = Replicator(store, PostgresTransport(pg_db, connect_timeout_seconds=2),
                     ReplicatorOptions(retry_initial_seconds=0.05, retry_max_seconds=0.5))
    rep.start()
    try:
        # Up: the entry is on the server when the call returns.
        first = store.put("runs/r1/steps/a", {"charged": 1250}, durability="remote")
        assert entry_rows(pg_db, node, first.lsn) == [("runs/r1/steps/a", False)]
        with store.batch(durability="remote") as b:
            b.put("runs/r1/steps/b", "two")
            b.delete("runs/r1/steps/a")
        assert b.result is not None
        assert sorted(entry_rows(pg_db, node, b.result.lsn)) == \
            [("runs/r1/steps/a", True), ("runs/r1/steps/b", False)]

        # Down: the commit is durable here, not on the server, and says so.
        pg_cluster.stop()
        started = time.monotonic()
        with pytest.raises(RemoteDurabilityTimeoutError) as info:
            store.put("runs/r1/steps/c", {"emailed": True}, durability="remote")
        waited = time.monotonic() - started
        message = str(info.value)
        assert "durable locally" in message
        assert "not yet replicated" in message
        assert isinstance(info.value, DurabilityError)
        assert info.value.retryable
        assert REMOTE_TIMEOUT_SECONDS <= waited < REMOTE_TIMEOUT_SECONDS + 2
        lost_lsn = info.value.lsn
        assert lost_lsn == store.applied_lsn
        assert store.get("runs/r1/steps/c") == {"emailed": True}
        status = rep.status()
        assert rep.error is None
        assert status.running
        assert status.last_error is not None
        assert status.retries > 0
        assert status.lag_entries >= 1
        assert status.acked_lsn < lost_lsn
        # A 'local' commit goes on working meanwhile.
        local = store.put("runs/r1/steps/d", "offline")

        # Back up: the replicator delivers it (once), without being asked again.
        pg_cluster.start()
        deadline = time.monotonic() + 30
        while not entry_rows(pg_db, node, lost_lsn):
            assert time.monotonic() < deadline, f"not replicated: {rep.status()}"
            time.sleep(0.1)
        assert entry_rows(pg_db, node, lost_lsn) == [("runs/r1/steps/c", False)]
        rep.wait_acknowledged(local.lsn, 10)
        assert entry_rows(pg_db, node, local.lsn) == [("runs/r1/steps/d", False)]
        again = store.put("runs/r1/steps/e", 5, durability="remote")
        assert entry_rows(pg_db, node, again.lsn) == [("runs/r1/steps/e", False)]
        with psycopg.connect(pg_db) as conn:
            (acked,) = one(conn, "select acked_lsn from walsync.nodes where node_id = %s",
                                    (node,))
            (count,) = one(conn, "select count(*) from walsync.entries where origin = %s",
                                    (node,))
        assert acked == again.lsn == store.applied_lsn
        assert count == 6  # a, b, a (tombstone), c, d, e: nothing twice
    finally:
        if not pg_cluster.running:
            pg_cluster.start()
        rep.stop()
        rep.transport.close()
        store.close()
