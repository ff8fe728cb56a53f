"""The entry log's retention on a real PostgreSQL, through both transports: compaction
runs one caller at a time (a server-side lock), a store that fell behind a collected
tombstone is refused and its replicator re-bootstraps, and the sync worker's compactor
calls the server on its own thread."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.gateway import PostgrestGateway
from tests.sync._helpers import entry, query, supabase_transport, wait_for
from walsync.engine import Store
from walsync.engine.versions import dominates_or_equal, join_vv
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


def _live_view(log: list[tuple[str, Any]]) -> dict[str, list[tuple[str, int]]]:
    """Each key's maximal versions, without the keys they leave deleted (a restore at a
    point shows no key whose only version there is a tombstone)."""
    by_key: dict[str, list[Any]] = {}
    for key, sib in log:
        by_key.setdefault(key, []).append(sib)
    out = {}
    for key, sibs in by_key.items():
        top = [s for s in sibs if not any(
            dominates_or_equal(o.version.vv, s.version.vv)
            and not dominates_or_equal(s.version.vv, o.version.vv) for o in sibs)]
        if not all(s.deleted for s in top):
            out[key] = sorted({(s.version.origin, s.version.lsn) for s in top})
    return out


@pytest.mark.parametrize("kind", ["memory", pytest.param("postgres", marks=pytest.mark.postgres)])
@pytest.mark.parametrize("seed", range(8))
def test_log_retention_compaction_keeps_every_cut_of_the_window_exact(
        seed: int, kind: str, request: pytest.FixtureRequest) -> None:
    """Random histories of three nodes writing and deleting a few keys (each write over
    what its node had seen), half of them older than the window: after compaction, the
    log cut at any point from the window's start on merges to what the whole log cut
    there did."""
    rng = random.Random(seed)
    t: Transport
    if kind == "memory":
        t = MemoryServer().transport()
    else:
        dsn: str = request.getfixturevalue("pg_db")
        migrate(dsn)
        t = PostgresTransport(dsn, timeout_seconds=30)
        request.addfinalizer(t.close)
    t.log_retention(3600)
    nodes = ["A", "B", "C"]
    lsn = dict.fromkeys(nodes, 0)
    seen: dict[tuple[str, str], dict[str, int]] = {}
    now_ms = int(time.time() * 1000)
    clock = now_ms - 3 * 3600 * 1000  # older than the window at first
    cuts = []
    for step in range(60):
        clock += rng.randrange(1, 400_000) if step != 30 else 2 * 3600 * 1000 + 1
        node = rng.choice(nodes)
        key = rng.choice(["k/1", "k/2", "k/3", "k/4"])
        if rng.random() < 0.4:  # the node reads the server's siblings of the key first
            for row in t.scope_backfill("-", key, 0, t.head(), [], None, 10).rows:
                if row.key == key:
                    seen[(node, key)] = join_vv([seen.get((node, key), {}),
                                                 row.sibling.version.vv])
        lsn[node] += 1
        vv = dict(seen.get((node, key), {}))
        vv[node] = lsn[node]
        seen[(node, key)] = vv
        value = None if rng.random() < 0.3 else step
        t.push(node, lsn[node], [entry(node, lsn[node], key, value, vv, hlc=clock << 16)])
        if clock > now_ms - 3600 * 1000:
            cuts.append(clock << 16)
    full = [(r.key, r.sibling) for r in t.log_page("", 1 << 62, 0, 10_000).rows]
    run = t.compact_log()
    assert run.removed_entries > 0
    kept = [(r.key, r.sibling) for r in t.log_page("", 1 << 62, 0, 10_000).rows]
    assert len(kept) < len(full)
    assert t.log_window().from_hlc == run.window_start_hlc
    for cut in [run.window_start_hlc, *cuts]:
        want = _live_view([(k, s) for k, s in full if s.version.hlc <= cut])
        got = _live_view([(k, s) for k, s in kept if s.version.hlc <= cut])
        assert got == want, (seed, cut)


@pytest.mark.postgres
def test_log_retention_compaction_waits_for_a_push_merging_into_a_tombstones_key(
        pg_db: str) -> None:
    """A key whose only sibling is a tombstone old enough to collect, while a push merges
    a version concurrent with it (not yet committed, so compaction cannot see it):
    compaction waits for the key's row the push holds and then sees two siblings, so
    the tombstone, the losing side the stores keep, stays on the server too."""
    migrate(pg_db)
    admin = PostgresTransport(pg_db, timeout_seconds=30)
    try:
        admin.log_retention(3600)
        old_ms = int(time.time() * 1000) - 2 * 3600 * 1000
        admin.push("T", 1, [entry("T", 1, "k/x", None, {"T": 1}, hlc=old_ms << 16)])
        page = admin.pull("P", 0, 100)  # the one live node pulls past the tombstone
        admin.pull("P", page.next, 100)
    finally:
        admin.close()
    pusher = psycopg.connect(pg_db)  # autocommit off: the push stays open
    compactor = psycopg.connect(pg_db, autocommit=True)
    try:
        batch = [entry("B", 1, "k/x", "kept", {"B": 1})]
        pusher.execute("select walsync_api.push(%s, %s, %s::jsonb)",
                       ("B", 1, json.dumps(batch)))
        pid = compactor.execute("select pg_backend_pid()").fetchone()
        assert pid is not None
        answer: list[Any] = []
        run = threading.Thread(target=lambda: answer.append(compactor.execute(
            "select walsync_api.compact_log()").fetchone()), daemon=True)
        run.start()
        blocked = False
        deadline = time.monotonic() + 10
        while not blocked and run.is_alive() and time.monotonic() < deadline:
            blocked = query(pg_db, "select count(*) from pg_stat_activity where pid = %s "
                                   "and wait_event_type = 'Lock'", (pid[0],))[0][0] == 1
            time.sleep(0.02)
        pusher.commit()
        run.join(30)
        assert not run.is_alive(), "compaction still runs after the push committed"
        siblings = query(pg_db, "select origin, lsn, deleted from walsync.siblings "
                                "where key = 'k/x' order by origin")
        assert siblings == [("B", 1, False), ("T", 1, True)]
        assert [a[0]["collected_tombstones"] for a in answer] == [0]
        assert blocked, "compaction did not wait for the push holding the key"
    finally:
        pusher.close()
        compactor.close()
