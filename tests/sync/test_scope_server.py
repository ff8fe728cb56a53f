"""Scoped pull on a real PostgreSQL: the server reads a scope's rows through its index
and none of another segment's (counted by the table's and indexes' own statistics),
whatever the size of the rest of the log."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from tests.sync._helpers import entry
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport

pytestmark = pytest.mark.postgres


def _reads(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """Sequential scans of walsync.entries so far, and index tuples read from it."""
    conn.execute("select pg_stat_force_next_flush()")
    row = conn.execute(
        "select t.seq_scan, (select coalesce(sum(i.idx_tup_read), 0) "
        "from pg_stat_user_indexes i where i.relid = t.relid) "
        "from pg_stat_user_tables t where t.relid = 'walsync.entries'::regclass").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _wait_reads(conn: psycopg.Connection[Any],
                before: tuple[int, int] | None) -> tuple[int, int]:
    """``_reads`` once the ended backends' statistics are in (they change from
    ``before``), or as they are after a short while."""
    deadline = time.monotonic() + 5
    while True:
        now = _reads(conn)
        if (before is not None and now != before) or time.monotonic() > deadline:
            return now
        if before is None:
            time.sleep(1.0)
            return _reads(conn)
        time.sleep(0.1)


def test_scope_pull_reads_no_row_of_another_segment(pg_db: str) -> None:
    migrate(pg_db)
    t = PostgresTransport(pg_db, timeout_seconds=30)
    try:
        others = 20_000
        batch = 2_000
        for first in range(1, others + 1, batch):
            t.push("A", first + batch - 1, [entry("A", n, f"other/{n}", n)
                                            for n in range(first, first + batch)])
        mine = [entry("A", others + n, f"app/{n}", n) for n in range(1, 51)]
        t.push("A", others + 50, mine)
        t.close()  # its backend's statistics are flushed as it ends
        with psycopg.connect(pg_db, autocommit=True) as conn:
            conn.execute("analyze walsync.entries")
            seq0, idx0 = _wait_reads(conn, None)
            puller = PostgresTransport(pg_db, timeout_seconds=30)
            cursor, got = 0, []
            while True:
                page = puller.pull("B", cursor, 20, prefixes=["app/"])
                got += [e["key"] for e in page.entries]
                if page.next <= cursor or page.next >= page.head:
                    break
                cursor = page.next
            puller.close()
            seq1, idx1 = _wait_reads(conn, (seq0, idx0))
        assert got == [f"app/{n}" for n in range(1, 51)]
        assert seq1 == seq0, "a scoped pull scanned the entry log"
        # each page reads its scope's rows (twice: to find the page, then to send it)
        # and a few probes; the 20,000 rows under other/ are never read
        assert idx1 - idx0 < 400, idx1 - idx0
    finally:
        t.close()


def test_scope_postgres_transport_pulls_from_a_server_without_pull_rows(pg_db: str) -> None:
    """A server before migration 10 has no pull_rows: the transport asks the plain pull,
    and says so for a scoped one (the server cannot filter)."""
    from tests.sync.test_migrate import DEFAULT, apply_files
    from walsync.engine.errors import RemoteSchemaError

    apply_files(pg_db, [f for f in DEFAULT if not f[0].startswith("20261207000010")])
    t = PostgresTransport(pg_db, timeout_seconds=30)
    try:
        t.push("A", 2, [entry("A", 1, "app/1", 1), entry("A", 2, "other/2", 2)])
        page = t.pull("B", 0, 10)
        assert [e["key"] for e in page.entries] == ["app/1", "other/2"]
        assert (page.next, page.head, page.scope) == (2, 2, None)
        with pytest.raises(RemoteSchemaError):
            t.pull("B", 0, 10, prefixes=["app/"])
    finally:
        t.close()
