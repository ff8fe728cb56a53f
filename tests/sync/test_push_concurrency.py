"""Pushes of different nodes at once (sync/PROTOCOL.md, "Positions and the pull cursor"
and "Scaling"): they do not wait on each other, the merge of a key they share is the one
a serial order gives, and pull stays gap-free.

Deterministic schedules hold one push in the middle of its work with a second connection
(an uncommitted row the push's insert must wait for, or a key's lock row) and check
what another push and a puller see meanwhile; random schedules run many nodes, each on
a connection of its own, writing a few hot keys in random orders.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.sync._helpers import entry, query
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport

pytestmark = pytest.mark.postgres

WAIT_SECONDS = 20.0  # how long a push that must not wait may take under a loaded machine


def _push_sql(conn: psycopg.Connection[Any], node: str, batch: list[dict[str, Any]],
              tenant: str = "") -> Any:
    """push in ``conn``'s open transaction (not committed here), as ``tenant``."""
    if tenant:
        conn.execute("select set_config('request.jwt.claims', %s, true)",
                     (json.dumps({"tenant_id": tenant}),))
    row = conn.execute("select walsync_api.push(%s, %s, %s::jsonb)",
                       (node, max(e["lsn"] for e in batch), json.dumps(batch))).fetchone()
    assert row is not None
    return row[0]


class _Call(threading.Thread):
    """A call on a thread of its own: its answer, or the exception it raised."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.answer: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.answer = self.fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def result(self, timeout: float = WAIT_SECONDS) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "the call is still waiting"
        if self.error is not None:
            raise self.error
        return self.answer


def _committed_push(dsn: str, node: str, batch: list[dict[str, Any]],
                    tenant: str = "") -> Any:
    with psycopg.connect(dsn) as conn:
        return _push_sql(conn, node, batch, tenant)


@pytest.fixture
def db(pg_db: str) -> str:
    migrate(pg_db)
    return pg_db


_stall_positions = itertools.count(-1, -1)


def _stall_entry(conn: psycopg.Connection[Any], origin: str, lsn: int, key: str,
                 tenant: str = "") -> None:
    """An uncommitted entry row (origin, lsn, key): a push of that entry reads it as new
    (it cannot see it), draws its positions, then waits at its insert until ``conn``
    ends. Its position is negative (each another): no pull ever reads it."""
    conn.execute("insert into walsync.entries (tenant, pos, origin, lsn, idx, key, deleted,"
                 " data, codec, vv, hlc) values (%s, %s, %s, %s, 0, %s, true, null, 0,"
                 " '{}', 0)", (tenant, next(_stall_positions), origin, lsn, key))


def _wait_until_blocked(dsn: str, count: int = 1) -> None:
    """Until ``count`` sessions wait on a lock."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        waiting = query(dsn, "select count(*) from pg_stat_activity "
                             "where wait_event_type = 'Lock' and datname = current_database()")
        if waiting[0][0] >= count:
            return
        time.sleep(0.02)
    raise AssertionError("no push is waiting on a lock")


def _pull_all(t: PostgresTransport, node: str, cursor: int) -> tuple[list[Any], int]:
    out: list[Any] = []
    while True:
        page = t.pull(node, cursor, 1000)
        out += page.entries
        if page.next <= cursor:
            return out, cursor
        cursor = page.next


def test_push_of_another_node_goes_on_while_one_is_in_flight_and_pull_skips_nothing(
        db: str) -> None:
    """The bigserial-gap trap, scheduled: A's push has drawn positions 1-2 and is not
    committed; B's push draws 3-4, commits, and is answered while A's still runs; a
    puller meanwhile is not let past A's positions; once A commits it gets all four."""
    stall = psycopg.connect(db)
    puller = PostgresTransport(db)
    try:
        _stall_entry(stall, "A", 1, "a/1")
        a = _Call(lambda: _committed_push(db, "A", [entry("A", 1, "a/1", 1),
                                                   entry("A", 1, "a/2", 2, idx=1)]))
        a.start()
        _wait_until_blocked(db)
        b = _Call(lambda: _committed_push(db, "B", [entry("B", 1, "b/1", 3),
                                                   entry("B", 1, "b/2", 4, idx=1)]))
        b.start()
        b_ack = b.result()  # B does not wait for A ...
        assert (b_ack["inserted"], b_ack["head"]) == (2, 0)  # ... but its head does
        assert a.is_alive()
        page = puller.pull("C", 0, 100)
        assert (page.entries, page.next, page.head) == ([], 0, 0)
        stall.rollback()
        assert a.result()["head"] == 4  # A publishes B's positions with its own
        got, cursor = _pull_all(puller, "C", 0)
        assert [(e["pos"], e["origin"], e["key"]) for e in got] == [
            (1, "A", "a/1"), (2, "A", "a/2"), (3, "B", "b/1"), (4, "B", "b/2")]
        assert cursor == 4
        assert query(db, "select pos from walsync.head") == [(4,)]
    finally:
        stall.close()
        puller.close()


def test_head_never_passes_a_push_in_flight_whatever_order_they_finish(db: str) -> None:
    """Three pushes stalled after drawing, released in random orders: after each commit
    the head is below every position still uncommitted, and a tailing puller ends with
    every entry exactly once, in position order."""
    rnd = random.Random(5)
    for round_ in range(4):
        stalls = {n: psycopg.connect(db) for n in ("A", "B", "C")}
        calls: dict[str, _Call] = {}
        puller = PostgresTransport(db)
        try:
            base = query(db, "select pos from walsync.head")[0][0]
            cursor, seen = base, []
            for k, node in enumerate(stalls):
                lsn = round_ + 1
                _stall_entry(stalls[node], node, lsn, f"{node}/{lsn}")
                batch = [entry(node, lsn, f"{node}/{lsn}", lsn),
                         entry(node, lsn, f"{node}/x", 0, idx=1)]
                calls[node] = _Call(functools.partial(_committed_push, db, node, batch))
                calls[node].start()
                _wait_until_blocked(db, k + 1)
            # drawn in the order they started: node k holds base + 2k + 1 and + 2
            first = {node: base + 2 * k + 1 for k, node in enumerate(stalls)}
            order = list(stalls)
            rnd.shuffle(order)
            for node in order:
                stalls[node].rollback()
                calls[node].result()
                head = query(db, "select pos from walsync.head")[0][0]
                in_flight = [first[n] for n in stalls if calls[n].is_alive()]
                assert head < min(in_flight, default=base + 7), (order, node, head)
                got, cursor = _pull_all(puller, "reader", cursor)
                seen += got
            assert query(db, "select pos from walsync.head")[0][0] == base + 6
            assert [e["pos"] for e in seen] == list(range(base + 1, base + 7)), order
        finally:
            for conn in stalls.values():
                conn.close()
            puller.close()


@pytest.mark.parametrize("vv_b", [{"A": 1, "B": 1}, {"B": 1}],
                         ids=["equal vectors", "dominated"])
def test_pushes_of_one_key_merge_one_after_the_other(db: str, vv_b: dict[str, int]) -> None:
    """A's version of k, committed or not, is what B's push of k is compared with: B's,
    equal to it or dominated by it, is ignored as in any serial order (both would be
    kept if B merged against the siblings it saw before A committed)."""
    holder = psycopg.connect(db)
    try:
        a = _push_sql(holder, "A", [entry("A", 1, "k", "a", {"A": 1, "B": 1})])
        assert a["merged"] == 1
        b = _Call(lambda: _committed_push(db, "B", [entry("B", 1, "k", "b", vv_b)]))
        b.start()
        _wait_until_blocked(db)  # on k's row (without it: at the head, having merged)
        holder.commit()
        assert (b.result()["inserted"], b.answer["merged"]) == (1, 0)
    finally:
        holder.close()
    assert query(db, "select origin, vv from walsync.siblings where key = 'k'") == [
        ("A", {"A": 1, "B": 1})]


def test_a_push_waits_for_no_other_node_but_the_one_sharing_its_keys(db: str) -> None:
    """A push holding k's row keeps only pushes of k waiting; one of other keys passes."""
    holder = psycopg.connect(db)
    try:
        holder.execute("insert into walsync.key_locks (key) values ('k')")
        blocked = _Call(lambda: _committed_push(db, "A", [entry("A", 1, "k", 1),
                                                          entry("A", 1, "z", 1, idx=1)]))
        blocked.start()
        _wait_until_blocked(db)
        free = _Call(lambda: _committed_push(db, "B", [entry("B", 1, "j", 2)]))
        free.start()
        assert free.result()["inserted"] == 1
        assert blocked.is_alive()
        holder.commit()
        assert blocked.result()["inserted"] == 2
    finally:
        holder.close()


def _maximal(vectors: list[dict[str, int]]) -> list[dict[str, int]]:
    """The distinct vectors no other one dominates (the siblings every serial merge of
    them leaves)."""
    def leq(a: dict[str, int], b: dict[str, int]) -> bool:
        return all(v <= b.get(k, 0) for k, v in a.items())
    distinct = [dict(t) for t in {tuple(sorted(v.items())) for v in vectors}]
    return sorted((v for v in distinct
                   if not any(leq(v, w) and v != w for w in distinct)),
                  key=lambda v: sorted(v.items()))


HOT_KEYS = ["hot/0", "hot/1", "hot/2"]


def _hot_writer(dsn: str, node: str, nodes: list[str], seed: int, batches: int,
                start: threading.Barrier, versions: dict[str, list[dict[str, int]]],
                errors: list[BaseException]) -> None:
    """A node pushing batches of its own keys and the hot keys, in random orders; its
    versions of a hot key grow (a node's later write dominates its earlier ones) and
    carry random components of other nodes (what it would have pulled)."""
    rnd = random.Random(seed)
    t = PostgresTransport(dsn, timeout_seconds=60)
    seen: dict[str, dict[str, int]] = {k: {} for k in HOT_KEYS}
    try:
        start.wait()
        lsn = 0
        for _ in range(batches):
            batch = []
            for _ in range(rnd.randint(1, 3)):
                lsn += 1
                keys = [*rnd.sample(HOT_KEYS, rnd.randint(1, 3)), f"own/{node}/{lsn}"]
                rnd.shuffle(keys)
                for i, key in enumerate(keys):
                    vv = None
                    if key in HOT_KEYS:
                        vv = dict(seen[key])
                        for other in rnd.sample(nodes, 2):
                            if other != node:
                                vv[other] = max(vv.get(other, 0), rnd.randint(0, 12))
                        vv[node] = lsn
                        vv = {k: v for k, v in vv.items() if v}
                        seen[key] = vv
                        versions[key].append(vv)
                    batch.append(entry(node, lsn, key, [node, lsn, key], vv, idx=i))
            t.push(node, lsn, batch)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)
    finally:
        t.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_many_nodes_writing_hot_keys_converge_without_deadlock(db: str, seed: int) -> None:
    """Twelve nodes, a connection each, push batches that write the same three keys in
    random orders: no push fails (a deadlock would), each hot key ends with exactly
    the maximal versions (every losing concurrent sibling kept, every dominated one
    gone, none twice), and a puller tailing them sees every entry once."""
    nodes = [f"n{i}" for i in range(12)]
    versions: dict[str, list[dict[str, int]]] = {k: [] for k in HOT_KEYS}
    errors: list[BaseException] = []
    start = threading.Barrier(len(nodes))
    threads = [threading.Thread(target=_hot_writer, daemon=True,
                                args=(db, n, nodes, seed * 100 + i, 8, start, versions,
                                      errors))
               for i, n in enumerate(nodes)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    for key in HOT_KEYS:
        stored = [v for (v,) in query(db, "select vv from walsync.siblings where key = %s",
                                      (key,))]
        assert sorted(stored, key=lambda v: sorted(v.items())) == _maximal(versions[key]), key
        assert len(stored) > 1  # concurrent versions were kept side by side
    total = query(db, "select count(*) from walsync.entries")[0][0]
    t = PostgresTransport(db)
    try:
        got, cursor = _pull_all(t, "reader", 0)
    finally:
        t.close()
    assert [e["pos"] for e in got] == list(range(1, total + 1))
    assert cursor == total == query(db, "select pos from walsync.head")[0][0]


def test_a_tenant_in_flight_holds_back_no_other_tenants_head(pg_db: str) -> None:
    """Tenant mode: A's push stalled after drawing neither delays B's push nor keeps
    B's head (or B's pulls) below B's own committed entries."""
    migrate(pg_db, tenant_mode=True)
    stall = psycopg.connect(pg_db)
    try:
        _stall_entry(stall, "n", 1, "a/1", tenant="A")
        a = _Call(lambda: _committed_push(pg_db, "n", [entry("n", 1, "a/1", 1)], "A"))
        a.start()
        _wait_until_blocked(pg_db)
        b = _committed_push(pg_db, "n", [entry("n", 1, "b/1", 1), entry("n", 2, "b/2", 2)], "B")
        assert (b["inserted"], b["head"]) == (2, 2)
        stall.rollback()
        assert a.result()["head"] == 1
    finally:
        stall.close()
    assert query(pg_db, "select tenant, pos from walsync.head order by 1") == [
        ("", 0), ("A", 1), ("B", 2)]
