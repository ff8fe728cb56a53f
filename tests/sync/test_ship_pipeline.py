"""Shipping with the next batch read while the current one is pushed (sync/shipping.py).

Pushes fail mid-pipeline, with the next batch being built on the other thread: before
the server got the batch, and after it committed it (the acknowledgement lost). Every
push starts right after the acknowledged LSN and runs in LSN order, the persisted
acknowledgement never passes what the server confirmed, and in the end the server holds
every entry exactly once. Also: a prepared batch's encoding is used only for exactly the
entries it was made from, upgrading a database (tenant mode too) installs the new push,
and the WAL reader asked for a few records reads about that much.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.sync._helpers import entry, local_entries, query, server_entry_ids
from walsync.engine import Store
from walsync.engine.errors import RemoteUnavailableError
from walsync.sync.migrate import _apply, list_migrations, migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.transport import PushAck, TransportProxy, WireBatch

pytestmark = pytest.mark.postgres


class FlakyTransport(TransportProxy):
    """A postgres transport whose pushes number ``fail_before`` fail before reaching the
    server and ``fail_after`` fail once the server committed them; each failure waits
    until the batch after it is being built on another thread: it happens mid-pipeline."""

    def __init__(self, real: PostgresTransport, store: Store, *, fail_before: set[int],
                 fail_after: set[int]) -> None:
        super().__init__(real)
        self.real = real
        self.store = store
        self.fail_before = fail_before
        self.fail_after = fail_after
        self.calls = 0
        #: the highest LSN the server confirmed so far
        self.confirmed = 0
        #: (first entry LSN, through LSN, persisted acknowledgement) of each push
        self.pushes: list[tuple[int, int, int]] = []
        #: first entry LSNs of the batches built off the shipping thread
        self.built_ahead: set[int] = set()
        self.built = threading.Condition()
        self.violations: list[str] = []

    def _acked(self) -> int:
        return self.store.sync_ledger.acked_lsn

    def prepare_push(self, entries: WireBatch) -> None:
        if threading.current_thread() is not threading.main_thread():
            with self.built:
                self.built_ahead.add(int(entries[0]["lsn"]))
                self.built.notify_all()
        self.real.prepare_push(entries)

    def push(self, node_id: str, through_lsn: int, entries: list[dict[str, Any]]) -> PushAck:
        self.calls += 1
        acked = self._acked()
        lsns = [int(e["lsn"]) for e in entries]
        if acked > self.confirmed:
            self.violations.append(f"acknowledged {acked}, the server confirmed {self.confirmed}")
        if lsns != sorted(lsns) or lsns[0] != acked + 1 or lsns[-1] > through_lsn:
            self.violations.append(f"push {self.calls}: LSNs {lsns[0]}..{lsns[-1]} through "
                                   f"{through_lsn} after acknowledged {acked}")
        self.pushes.append((lsns[0], through_lsn, acked))
        if self.calls in self.fail_before | self.fail_after:
            with self.built:  # every record has entries: the next batch starts right after
                assert self.built.wait_for(lambda: through_lsn + 1 in self.built_ahead, 10)
        if self.calls in self.fail_before:
            raise RemoteUnavailableError("injected: the batch never reached the server")
        ack = self.real.push(node_id, through_lsn, entries)
        self.confirmed = max(self.confirmed, ack.acked_lsn)
        if self.calls in self.fail_after:
            raise RemoteUnavailableError("injected: the acknowledgement was lost")
        return ack


def _store_with_records(path: Path, count: int) -> Store:
    store = Store.open(path, node_id="A", durability="none")
    for i in range(count):
        if i % 3:
            store.put(f"k/{i % 17}", {"i": i})
        else:
            with store.batch() as batch:  # records of two keys
                batch.put(f"t/{i}/a", i)
                batch.put(f"t/{i}/b", -i)
    store.flush()
    return store


def test_pipelined_ship_survives_push_failures_mid_pipeline_in_lsn_order(
        tmp_path: Path, pg_db: str) -> None:
    migrate(pg_db)
    store = _store_with_records(tmp_path / "a", 120)
    try:
        flaky = FlakyTransport(PostgresTransport(pg_db), store, fail_before={2, 6},
                               fail_after={4, 9})
        rep = Replicator(store, flaky, ReplicatorOptions(pull=False, batch_records=10))
        failures = 0
        while True:
            try:
                rep.ship()
                break
            except RemoteUnavailableError:
                failures += 1
                assert failures <= 4
        assert failures == 4
        assert flaky.violations == []
        assert len(flaky.built_ahead) >= 8  # the batches after the first were read ahead
        # after each failure the batch is sent again from the acknowledged LSN
        firsts = [first for first, _, _ in flaky.pushes]
        for call in (2, 4, 6, 9):
            assert firsts[call] == firsts[call - 1]
        assert rep.acked_lsn == store.shippable_lsn == flaky.confirmed
        assert store.sync_ledger.acked_lsn == rep.acked_lsn
        expected = sorted(("A", int(e["lsn"]), e["key"]) for e in local_entries(store))
        assert sorted(server_entry_ids(pg_db)) == expected  # each once: the ids are the key
        assert query(pg_db, "select acked_lsn from walsync.nodes where node_id = 'A'") == [
            (store.shippable_lsn,)]
        positions = [p for (p,) in query(pg_db, "select pos from walsync.entries order by pos")]
        assert positions == list(range(1, len(expected) + 1))
    finally:
        flaky.close()
        store.close()


def test_pipelined_ship_sends_each_record_once_across_calls(
        tmp_path: Path, pg_db: str) -> None:
    migrate(pg_db)
    store = _store_with_records(tmp_path / "a", 35)
    try:
        rep = Replicator(store, PostgresTransport(pg_db),
                         ReplicatorOptions(pull=False, batch_records=10))
        assert rep.ship() == len(local_entries(store))
        assert rep.acked_lsn == store.shippable_lsn
        assert rep.ship() == 0  # nothing new: no push
        store.put("late", 1)
        store.flush()
        assert rep.ship() == 1
        assert rep.acked_lsn == store.shippable_lsn
    finally:
        rep.close()
        store.close()


def test_prepared_encoding_is_used_only_for_the_entries_it_was_made_from(pg_db: str) -> None:
    migrate(pg_db)
    t = PostgresTransport(pg_db)
    try:
        batch = WireBatch([entry("A", n, f"k{n}", n) for n in range(1, 5)])
        t.prepare_push(batch)
        assert batch.kept("postgres") is not None
        assert batch.kept("supabase") is None
        t.push("A", 2, batch[:2])  # a slice is a plain list: encoded again
        assert server_entry_ids(pg_db) == [("A", 1, "k1"), ("A", 2, "k2")]
        batch.pop()  # changed after it was encoded: its encoding is stale
        assert batch.kept("postgres") is None
        ack = t.push("A", 3, batch)
        assert (ack.inserted, ack.acked_lsn) == (1, 3)
        assert server_entry_ids(pg_db)[-1] == ("A", 3, "k3")
        t.prepare_push(batch)
        assert batch.kept("postgres") is not None
        batch[0] = entry("A", 4, "k4", 4)  # replaced in place
        assert batch.kept("postgres") is None
    finally:
        t.close()


@pytest.mark.parametrize("tenant", [False, True])
def test_migrate_upgrades_push_on_a_database_from_before(pg_db: str, tenant: bool) -> None:
    """A database holding schema version 2 (and tenant mode, if on) gets the new push
    from a plain ``migrate``, tenant-scoped again when tenant mode is on."""
    older = [m for m in list_migrations() if m[0] < "20261123000003"]
    with psycopg.connect(pg_db, autocommit=True) as conn:
        for version, path in older:
            _apply(conn, version, path, force=False)
        if tenant:  # the tenant file of that time (since retired: released_migrations/)
            path = (Path(__file__).with_name("released_migrations") / "tenant"
                    / "20261123000101_tenant_mode.sql")
            _apply(conn, path.name[:14], path, force=False)
    before = PostgresTransport(pg_db)
    try:
        assert before.push("A", 1, [entry("A", 1, "k", 1)]).inserted == 1
    finally:
        before.close()
    report = migrate(pg_db)
    assert "20261123000003_push_faster.sql" in report.applied
    [(source, owner)] = query(
        pg_db, "select p.prosrc, pg_get_userbyid(p.proowner) from pg_proc p "
               "where p.oid = 'walsync_api.push(text, bigint, bigint[], integer[], text[], "
               "boolean[], bytea[], smallint[], jsonb[], bigint[], bigint[], text[], "
               "text[])'::regprocedure")
    assert "require_tenant()" in source  # one push, scoped by tenant in both modes
    assert (owner == "walsync_tenant_api") is tenant
    after = PostgresTransport(pg_db)
    try:
        again = after.push("A", 1, [entry("A", 1, "k", 1)])
        assert (again.inserted, again.merged, again.acked_lsn) == (0, 0, 1)
        ack = after.push("A", 2, [entry("A", 2, "k", 2, {"A": 2})])
        assert (ack.inserted, ack.merged, ack.head) == (1, 1, 2)
    finally:
        after.close()
    assert query(pg_db, "select key, origin, lsn from walsync.siblings") == [("k", "A", 2)]


def test_wal_reader_asked_for_a_few_records_reads_about_that_much(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read ahead in steps of a few records, the reader copies about those records from the
    segment (the active one is preallocated: a fixed 4 MiB read copied 4 MiB every time)."""
    import walsync.engine.feed

    store = _store_with_records(tmp_path / "a", 40)
    sizes: list[int] = []
    real_pread = walsync.engine.feed.os.pread

    def pread(fd: int, size: int, offset: int) -> bytes:
        sizes.append(size)
        return real_pread(fd, size, offset)

    try:
        monkeypatch.setattr(walsync.engine.feed.os, "pread", pread)
        reader = store.wal_reader()
        lsns: list[int] = []
        while len(lsns) < 40:
            lsns += [r.lsn for r in reader.read(len(lsns), store.shippable_lsn, 5)]
        assert lsns == list(range(1, 41))
        assert sizes
        assert max(sizes) <= 5 * 4096
    finally:
        store.close()


class SlowTransport(TransportProxy):
    """A postgres transport whose pushes each take ``seconds``, counted."""

    def __init__(self, real: PostgresTransport, seconds: float) -> None:
        super().__init__(real)
        self.real = real
        self.seconds = seconds
        self.pushes = 0
        self.closed = False

    def prepare_push(self, entries: WireBatch) -> None:
        self.real.prepare_push(entries)

    def push(self, node_id: str, through_lsn: int, entries: list[dict[str, Any]]) -> PushAck:
        assert not self.closed, "pushed through a closed transport"
        time.sleep(self.seconds)
        self.pushes += 1
        return self.real.push(node_id, through_lsn, entries)

    def close(self) -> None:
        self.closed = True
        self.real.close()


def test_stop_ends_a_long_ship_between_batches(tmp_path: Path, pg_db: str) -> None:
    """A backlog takes many pushes: stop() ends the ship after the batch in flight
    instead of shipping on after it returned, and close() never closes the
    connection under a running push."""
    migrate(pg_db)
    store = _store_with_records(tmp_path / "a", 3000)
    slow = SlowTransport(PostgresTransport(pg_db), 0.05)
    rep = Replicator(store, slow, ReplicatorOptions(pull=False, batch_records=50))
    try:
        rep.start()
        deadline = time.monotonic() + 20
        while slow.pushes < 3:
            assert time.monotonic() < deadline, "the replicator never pushed"
            time.sleep(0.01)
        started = time.monotonic()
        rep.close()
        assert time.monotonic() - started < 2, "stop() waited out the whole backlog"
        pushes = slow.pushes
        time.sleep(0.3)
        assert slow.pushes == pushes, "the replicator pushed after stop() returned"
        assert 0 < rep.acked_lsn < store.shippable_lsn  # it did stop part way
    finally:
        store.close()


#: walsync.run_of, slowed down for one key: it widens the window between deciding a
#: push's refusals and recording them (this test's database only)
SLOW_RUN_OF = """
create or replace function walsync.run_of(p_key text) returns text language plpgsql volatile as $$
begin
  if p_key = 'runs/slow/x' then perform pg_sleep(1); end if;
  return case when p_key like 'runs/%' then split_part(substr(p_key, 6), '/', 1)
              when p_key like 'index/runs/%' then split_part(substr(p_key, 12), '/', 1) end;
end $$;
"""


def test_a_lease_taken_during_a_push_does_not_mark_merged_entries_fenced(pg_db: str) -> None:
    """The push records as fenced exactly the entries it refused: a lease taken on
    another run while the push runs does not add that run's merged entry."""
    migrate(pg_db)
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute(SLOW_RUN_OF)
        conn.execute("insert into walsync.leases (run_id, holder, token, expires_at) "
                     "values ('R1', 'B', 2, now() + interval '1 hour')")

    def take_lease() -> None:
        time.sleep(0.5)
        with psycopg.connect(pg_db, autocommit=True) as conn:
            conn.execute("insert into walsync.leases (run_id, holder, token, expires_at) "
                         "values ('R2', 'C', 1, now() + interval '1 hour')")

    stale = entry("A", 1, "runs/R1", 1)
    stale["fence"] = 1  # R1's lease is at token 2: refused
    taker = threading.Thread(target=take_lease)
    taker.start()
    transport = PostgresTransport(pg_db)
    try:
        ack = transport.push("A", 3, [stale, entry("A", 2, "runs/R2", 2),
                                      entry("A", 3, "runs/slow/x", 3)])
    finally:
        taker.join()
        transport.close()
    assert [f.run_id for f in ack.fenced] == ["R1"]
    assert query(pg_db, "select key from walsync.fenced order by key") == [("runs/R1",)]
    assert query(pg_db, "select key from walsync.siblings order by key") == [
        ("runs/R2",), ("runs/slow/x",)]
