"""The pull cursor under concurrent pushers (PROTOCOL "Positions and the pull
cursor"): a puller tailing ``pull(after=cursor)`` while many nodes push at once sees every
entry exactly once. Pushes run at the same time, so positions are not handed out in commit
order; the head a puller reads up to stays below every push in flight, so a row can never
commit with a position below one a puller has already passed (the bigserial gap problem).
"""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest

from tests.sync._helpers import entry, query
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport

pytestmark = pytest.mark.postgres

PUSHERS = 8
ENTRIES_EACH = 300


def _pusher(dsn: str, node: str, seed: int, start: threading.Barrier,
            pushed: list[tuple[str, int, str]], errors: list[BaseException]) -> None:
    rnd = random.Random(seed)
    t = PostgresTransport(dsn)
    try:
        start.wait()
        lsn, sent = 0, 0
        while sent < ENTRIES_EACH:
            batch: list[dict[str, Any]] = []
            for _ in range(rnd.randint(1, 3)):  # 1-3 records of 1-3 keys
                lsn += 1
                for i in range(min(rnd.randint(1, 3), ENTRIES_EACH - sent)):
                    batch.append(entry(node, lsn, f"{node}/{lsn}/{i}", rnd.random(), idx=i))
                    sent += 1
                if sent >= ENTRIES_EACH:
                    break
            ack = t.push(node, lsn, batch)
            assert ack.inserted == len(batch)
            pushed.extend((node, e["lsn"], e["key"]) for e in batch)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)
    finally:
        t.close()


def test_pull_cursor_tailing_puller_sees_every_entry_once_under_concurrent_pushers(
        pg_db: str) -> None:
    migrate(pg_db)
    start = threading.Barrier(PUSHERS + 1)
    pushed: list[tuple[str, int, str]] = []
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_pusher, args=(pg_db, f"node{n}", n, start, pushed,
                                                      errors), daemon=True)
               for n in range(PUSHERS)]
    for th in threads:
        th.start()

    puller = PostgresTransport(pg_db)
    rnd = random.Random(7)
    seen: list[tuple[str, int, str]] = []
    positions: list[int] = []
    page_records: list[dict[tuple[str, int], int]] = []
    cursor, pages, nonempty_while_pushing = 0, 0, 0
    try:
        start.wait()
        while True:
            pushing = any(th.is_alive() for th in threads)
            page = puller.pull("tail", cursor, rnd.randint(1, 40))
            pages += 1
            assert page.next >= cursor
            for e in page.entries:
                assert cursor < e["pos"] <= page.next
            by_record: dict[tuple[str, int], int] = {}
            for e in page.entries:
                by_record[(e["origin"], e["lsn"])] = by_record.get((e["origin"], e["lsn"]), 0) + 1
            page_records.append(by_record)
            seen += [(e["origin"], e["lsn"], e["key"]) for e in page.entries]
            positions += [e["pos"] for e in page.entries]
            if page.entries and pushing:
                nonempty_while_pushing += 1
            cursor = page.next
            if not pushing and cursor >= page.head:
                break
    finally:
        puller.close()
        for th in threads:
            th.join(timeout=60)
    assert not errors, errors
    total = PUSHERS * ENTRIES_EACH
    assert len(pushed) == total
    assert nonempty_while_pushing > 20  # it really tailed the pushers
    assert len(seen) == len(set(seen)) == total  # nothing twice ...
    assert set(seen) == set(pushed)  # ... nothing skipped
    assert positions == sorted(positions)
    assert positions == list(range(1, total + 1))  # dense: no position lost or reused
    assert query(pg_db, "select pos from walsync.head") == [(total,)]
    # whole records: every record's keys arrived in one page, and each origin's
    # records arrived in the order it pushed them
    sizes: dict[tuple[str, int], int] = {}
    for origin, lsn, _ in pushed:
        sizes[(origin, lsn)] = sizes.get((origin, lsn), 0) + 1
    for by_record in page_records:
        assert all(sizes[rec] == count for rec, count in by_record.items()), by_record
    for n in range(PUSHERS):
        lsns = [lsn for origin, lsn, _ in seen if origin == f"node{n}"]
        assert lsns == sorted(lsns)
    assert pages > 50


def test_pull_cursor_is_recorded_and_never_moves_back(pg_db: str) -> None:
    migrate(pg_db)
    t = PostgresTransport(pg_db)
    try:
        for n in range(1, 6):
            t.push("A", n, [entry("A", n, f"k{n}", n)])
        page = t.pull("B", 0, 2)
        assert [e["lsn"] for e in page.entries] == [1, 2]
        t.pull("B", page.next, 2)
        assert t.node_status("B").pull_cursor == 2
        t.pull("B", 1, 10)  # an older position (say, after a local crash) ...
        assert t.node_status("B").pull_cursor == 2  # ... never lowers the confirmed one
        assert t.pull("B", 5, 10).entries == []
        assert t.node_status("B").pull_cursor == 5
    finally:
        t.close()
