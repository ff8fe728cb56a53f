"""A pull ships between its pages only what a ``remote`` commit waits for: the store's
other commits reach the server at the next ship, so what a host pushes, and the lease
each of its entries meets there, is decided when it ships (real PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.sync._helpers import entry, query
from walsync.engine import Store
from walsync.engine.errors import RemoteDurabilityTimeoutError
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

OPTIONS = ReplicatorOptions(batch_wait_seconds=0, pull_limit=2)


def _backlog(dsn: str, first: int, count: int) -> None:
    """Entries of another origin, several pull pages of them."""
    pusher = PostgresTransport(dsn, timeout_seconds=30)
    try:
        pusher.push("other", first + count - 1,
                    [entry("other", n, f"other/{n}", n) for n in range(first, first + count)])
    finally:
        pusher.close()


def _pushed(dsn: str, node: str) -> set[int]:
    return {lsn for (lsn,) in query(dsn, "select lsn from walsync.entries where origin = %s",
                                    (node,))}


def test_a_pull_pushes_no_commit_nobody_waits_for(pg_db: str, tmp_path: Path) -> None:
    migrate(pg_db)
    store = Store.open(tmp_path / "s", node_id="puller")
    rep = Replicator(store, PostgresTransport(pg_db, timeout_seconds=30), OPTIONS)
    try:
        rep.ship()  # claimed, nothing to push yet
        _backlog(pg_db, 1, 9)
        first = store.put("mine/0", 0)
        assert rep.pull() == 9
        assert store.get("other/9") == 9
        assert rep.acked_lsn < first.lsn
        assert _pushed(pg_db, "puller") == set()

        # a 'remote' commit waits: the next pull ships it (and what came before) first
        second = store.put("mine/1", 1)
        with pytest.raises(RemoteDurabilityTimeoutError):
            rep.wait_acknowledged(second.lsn, 0.01)
        _backlog(pg_db, 10, 9)
        assert rep.pull() == 9
        assert rep.acked_lsn >= second.lsn
        assert _pushed(pg_db, "puller") == {first.lsn, second.lsn}

        # acknowledged, it waits no more: later commits wait for the next ship again
        third = store.put("mine/2", 2)
        _backlog(pg_db, 19, 9)
        assert rep.pull() == 9
        assert _pushed(pg_db, "puller") == {first.lsn, second.lsn}
        rep.ship()
        assert _pushed(pg_db, "puller") == {first.lsn, second.lsn, third.lsn}
    finally:
        rep.close()
        store.close()
