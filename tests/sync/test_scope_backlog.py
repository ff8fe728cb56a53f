"""A backlog pull never delays the acknowledgement of the store's own ``remote`` commits:
with 100,000 entries of another store to pull (real PostgreSQL), a ``remote`` commit made
while the pull runs returns long before the pull is done."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.sync._helpers import entry, wait_for
from walsync.engine import Store
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(300)]

BACKLOG = 100_000


def test_scope_backlog_pull_never_delays_a_remote_commit(pg_db: str, tmp_path: Path) -> None:
    migrate(pg_db)
    pusher = PostgresTransport(pg_db, timeout_seconds=120)
    try:
        batch = 2000
        for first in range(1, BACKLOG + 1, batch):
            pusher.push("other", first + batch - 1,
                        [entry("other", n, f"other/{n:07d}", {"n": n})
                         for n in range(first, first + batch)])
        head = pusher.head()
    finally:
        pusher.close()
    store = Store.open(tmp_path / "fresh", node_id="fresh")
    rep = Replicator(store, PostgresTransport(pg_db, timeout_seconds=60),
                     ReplicatorOptions(pull_interval_seconds=0.01, batch_wait_seconds=0))
    try:
        rep.start()
        wait_for(lambda: rep.status().pulled_entries > 0, what="the backlog pull to start")
        for i in range(3):
            started = time.monotonic()
            done = store.put(f"mine/{i}", i, durability="remote")
            took = time.monotonic() - started
            status = rep.status()
            # acknowledged while most of the backlog is still to come: the pull let the
            # commit's push go between two of its pages
            assert rep.acked_lsn >= done.lsn
            assert status.pulled_entries < BACKLOG, (i, took, status.pulled_entries)
            assert took < 5.0, took
        wait_for(lambda: rep.status().pulled_entries >= BACKLOG, timeout=240,
                 what="the backlog pulled")
        assert store.get("other/0100000") == {"n": BACKLOG}
        assert rep.status().pull_cursor >= head
    finally:
        rep.close()
        store.close()
