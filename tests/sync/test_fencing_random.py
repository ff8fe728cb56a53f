"""Fencing under random schedules: several hosts take, lose and take over the leases of
a few runs, write through the workflow layer (fresh and stale Runs) and around it (with
no token, a token copied from the run record, their own), push, pull, and are lost and
restored elsewhere. Hypothesis drives the schedule against a real PostgreSQL, through
both transports.

What must hold:
* locally, every record a host's workflow layer writes to a run carries that host's own
  acquisition's token (or 0 when it holds none), never one it did not acquire; a
  refusal (LeaseLostError) writes nothing;
* on every push, an entry for a run's key is merged iff, when the push ran, the pusher
  held the run's lease (live or expired without a new holder) and the entry carries its
  token, or nobody leased the run (it is no one's); every other entry is in
  walsync.fenced with the lease it met, and the pusher's replicator said so (lost_runs and
  a LeaseLostEvent when another node holds the lease, stale_refused when it is its own);
* the merged state (walsync.siblings) of the runs holds accepted entries only.

Lease expiry is the database's clock passing the lease's end (its expires_at moved into
the past), as a TTL running out would.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from tests.gateway import PostgrestGateway
from tests.sync._helpers import local_entries, query, supabase_transport
from walsync.engine import LeaseLostEvent, Put, Store
from walsync.engine.errors import ConflictError, LeaseHeldError, LeaseLostError
from walsync.engine.events import Subscription
from walsync.engine.workflow import Run, RunRecord, Workflows, held_lease, keys
from walsync.sync.lease import Leases
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.restore import restore
from walsync.sync.transport import Transport

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(600)]

HOSTS = 3
RUNS = 2
OPTIONS = ReplicatorOptions(batch_wait_seconds=0, batch_records=7, pull_limit=5,
                            retry_initial_seconds=0.02, retry_max_seconds=0.3)


@dataclass
class Host:
    directory: Path
    store: Store
    rep: Replicator
    leases: Leases
    #: run id -> every token this host's own acquisitions returned
    acquired: dict[str, set[int]] = field(default_factory=dict)
    #: (run id, current token) of every LeaseLostEvent it received
    lost_events: set[tuple[str, int]] = field(default_factory=set)
    #: Runs kept in memory across steps (they go stale as others write)
    cached: dict[str, Run] = field(default_factory=dict)
    lost: Subscription | None = None


class FencingModel(RuleBasedStateMachine):
    dsn: str
    transport: Callable[[], Transport]
    #: across examples: entries checked merged, refused; refusals reported lost, stale
    tally: dict[str, int]

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="walsync-fencing-"))
        self.tag = uuid.uuid4().hex[:8]
        self.runs = [f"{self.tag}-r{i}" for i in range(RUNS)]
        self.hosts: list[Host] = []
        self.opened: list[Transport] = []
        self.counter = 0
        #: (origin, lsn, key) of entries checked on push: merged, refused
        self.accepted: set[tuple[str, int, str]] = set()
        self.refused: set[tuple[str, int, str]] = set()

    def _transport(self) -> Transport:
        t = type(self).transport()
        self.opened.append(t)
        return t

    def _host(self, directory: Path, store: Store) -> Host:
        return Host(directory, store, Replicator(store, self._transport(), OPTIONS),
                    Leases(self._transport(), store=store, ttl_seconds=600),
                    lost=store.events.subscribe(kinds="lease_lost"))

    @initialize()
    def start(self) -> None:
        for i in range(HOSTS):
            directory = self.root / f"h{i}-0"
            self.hosts.append(self._host(directory, Store.open(directory)))

    def teardown(self) -> None:
        try:
            if self.hosts:
                self._check_merged_state()
        finally:
            for h in self.hosts:
                if h.lost is not None:
                    h.lost.close()
                h.store.close()
            for t in self.opened:
                t.close()
            shutil.rmtree(self.root, ignore_errors=True)

    def _next(self) -> int:
        self.counter += 1
        return self.counter

    # -- leases ------------------------------------------------------------------------

    @rule(h=st.integers(0, HOSTS - 1), r=st.integers(0, RUNS - 1))
    def acquire(self, h: int, r: int) -> None:
        host, run_id = self.hosts[h], self.runs[r]
        try:
            lease = host.leases.acquire(run_id)
        except LeaseHeldError:
            return
        assert lease.holder == host.store.node_id
        host.acquired.setdefault(run_id, set()).add(lease.token)
        assert held_lease(host.store, run_id) == lease.token

    @rule(h=st.integers(0, HOSTS - 1), r=st.integers(0, RUNS - 1))
    def acquire_and_step(self, h: int, r: int) -> None:
        """What an orchestrator does: take the run's lease, then drive it."""
        self.acquire(h, r)
        self.step(h, r, keep=False)

    @rule(h=st.integers(0, HOSTS - 1), r=st.integers(0, RUNS - 1))
    def write_then_acquire(self, h: int, r: int) -> None:
        """A write made before taking the lease: the holder's own stale write once pushed."""
        self.write_around(h, r, "none")
        self.acquire(h, r)

    @rule(r=st.integers(0, RUNS - 1))
    def expire(self, r: int) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("update walsync.leases set expires_at = now() - interval '1 second' "
                         "where run_id = %s", (self.runs[r],))

    # -- writes ------------------------------------------------------------------------

    def _check_local(self, host: Host, run_id: str, before: int, held: int | None) -> None:
        """The records the workflow layer just wrote carry this host's own token."""
        own = host.acquired.get(run_id, set())
        for e in local_entries(host.store):
            if e["lsn"] > before:
                assert e["fence"] == (held or 0), (e, held)
                assert e["fence"] == 0 or e["fence"] in own, (e, own)

    def _refusal_is_right(self, host: Host, run_id: str, exc: LeaseLostError) -> None:
        """A local refusal names another host's lease that this host holds no newer
        token for (or its own, once dropped), as the server handed it out (the
        server's current one, or an older one)."""
        held = held_lease(host.store, run_id)
        assert exc.run_id == run_id
        assert exc.current_token > 0
        if held is not None:
            assert exc.holder != host.store.node_id, (exc, held)
            assert held <= exc.current_token, (exc, held)
        (holder, token), = query(self.dsn, "select holder, token from walsync.leases "
                                           "where run_id = %s", (run_id,))
        assert exc.current_token <= token
        if exc.current_token == token:
            assert exc.holder == holder

    @rule(h=st.integers(0, HOSTS - 1), r=st.integers(0, RUNS - 1), keep=st.booleans())
    def step(self, h: int, r: int, keep: bool) -> None:
        host, run_id = self.hosts[h], self.runs[r]
        held = held_lease(host.store, run_id)
        before = host.store.applied_lsn
        n = self._next()
        try:
            run = Workflows(host.store).run("w", run_id)
            run.step(f"s{n}", lambda: n)
        except LeaseLostError as exc:
            self._refusal_is_right(host, run_id, exc)
            created = host.store.applied_lsn
            assert created - before <= 1  # at most the run's creation, before the refusal
        else:
            if keep:
                host.cached[run_id] = run
        self._check_local(host, run_id, before, held)

    @rule(h=st.integers(0, HOSTS - 1), r=st.integers(0, RUNS - 1))
    def stale_step(self, h: int, r: int) -> None:
        host, run_id = self.hosts[h], self.runs[r]
        run = host.cached.get(run_id)
        if run is None:
            return
        held = held_lease(host.store, run_id)
        before = host.store.applied_lsn
        n = self._next()
        try:
            run.step(f"s{n}", lambda: n)
        except LeaseLostError as exc:
            self._refusal_is_right(host, run_id, exc)
            assert host.store.applied_lsn == before
            host.cached.pop(run_id)
        except ConflictError:
            # a real conflict (someone else wrote the record meanwhile), not a lease
            # this host lacks: the current record is one it may write
            raw = host.store.get(keys.run(run_id))
            assert raw is not None
            record = RunRecord.from_dict(raw)
            token = record.lease_token or 0
            assert token == 0 or (held is not None and (
                held > token or (held == token and record.owner_node == host.store.node_id)))
            assert host.store.applied_lsn == before
            host.cached.pop(run_id)
        self._check_local(host, run_id, before, held)

    @rule(h=st.integers(0, HOSTS - 1), r=st.integers(0, RUNS - 1),
          which=st.sampled_from(["none", "record", "own"]))
    def write_around(self, h: int, r: int, which: str) -> None:
        """A write that bypasses the workflow layer: no token, the record's, its own."""
        host, run_id = self.hosts[h], self.runs[r]
        token = 0
        if which == "record":
            raw = host.store.get(keys.run(run_id))
            token = int((raw or {}).get("lease_token") or 0)
        elif which == "own":
            token = max(host.acquired.get(run_id, {0}))
        n = self._next()
        host.store.commit([Put(f"{keys.all_of_run(run_id)}raw/{n}", n, fence=token)],
                          internal=True)

    # -- sync --------------------------------------------------------------------------

    @rule(h=st.integers(0, HOSTS - 1))
    def push(self, h: int) -> None:
        host = self.hosts[h]
        node = host.store.node_id
        leases = {run_id: (holder, token) for run_id, holder, token in query(
            self.dsn, "select run_id, holder, token from walsync.leases "
                      "where run_id = any(%s)", (self.runs,))}
        after = host.rep.acked_lsn
        host.rep.ship()
        assert host.rep.acked_lsn == host.store.applied_lsn
        shipped = [e for e in local_entries(host.store)
                   if after < e["lsn"] <= host.rep.acked_lsn and keys.run_of(e["key"]) in self.runs]
        if not shipped:
            return
        stored = {(lsn, key) for lsn, key in query(
            self.dsn, "select lsn, key from walsync.entries where origin = %s and lsn > %s",
            (node, after))}
        fenced = {(lsn, key): (current, holder) for lsn, key, current, holder in query(
            self.dsn, "select lsn, key, current, holder from walsync.fenced "
                      "where origin = %s and lsn > %s", (node, after))}
        refused_runs: dict[str, tuple[int, str | None]] = {}
        for e in shipped:
            run_id = keys.run_of(e["key"])
            assert run_id is not None
            ident = (e["lsn"], e["key"])
            if run_id in leases:
                holder, token = leases[run_id]
                ok = holder == node and e["fence"] == token
            else:  # nobody leased the run: no one's, merged like any key
                holder, token = None, 0
                ok = True
            if ok:
                assert ident in stored, (e, leases.get(run_id))
                assert ident not in fenced, (e, leases.get(run_id))
                self.accepted.add((node, *ident))
            else:
                assert ident not in stored, (e, leases.get(run_id))
                assert fenced.get(ident) == (token, holder), (e, fenced.get(ident))
                self.refused.add((node, *ident))
                refused_runs[run_id] = (token, holder)
        status = host.rep.status()
        assert host.lost is not None
        while (event := host.lost.get(timeout_seconds=0)) is not None:
            if isinstance(event, LeaseLostEvent):
                host.lost_events.add((event.run_id, event.current_token))
        self.tally["merged"] += sum(1 for e in shipped if (node, e["lsn"], e["key"])
                                    in self.accepted)
        for run_id, (current, holder) in refused_runs.items():
            self.tally["refused"] += 1
            if holder == node:
                self.tally["stale"] += 1
                assert status.stale_refused.get(run_id) == current, (run_id, status)
            else:
                self.tally["lost"] += 1
                assert status.lost_runs.get(run_id) == current, (run_id, status)
                # the event comes through the store's events thread: wait for it, boundedly
                deadline = time.monotonic() + 10
                while ((run_id, current) not in host.lost_events
                       and (left := deadline - time.monotonic()) > 0):
                    event = host.lost.get(timeout_seconds=left)
                    if isinstance(event, LeaseLostEvent):
                        host.lost_events.add((event.run_id, event.current_token))
                assert (run_id, current) in host.lost_events, (run_id, host.lost_events)
                # told, the host no longer writes the run with a lease it lost
                held = held_lease(host.store, run_id)
                assert held is None or held > current

    @rule()
    def push_all(self) -> None:
        for h in range(len(self.hosts)):
            self.push(h)

    @rule(h=st.integers(0, HOSTS - 1))
    def pull(self, h: int) -> None:
        self.hosts[h].rep.pull()

    @rule(h=st.integers(0, HOSTS - 1))
    def lose_and_restore(self, h: int) -> None:
        """Host h is lost (with what it never pushed); a new host restores the runs."""
        old = self.hosts[h]
        old.lost.close()
        old.store.close()
        directory = self.root / f"h{h}-{self._next()}"
        report = restore(self._transport(), directory, prefix=f"{keys.RUNS}{self.tag}-")
        store = Store.open(directory, create=False)
        assert store.node_id == report.node_id != old.store.node_id
        for run_id in self.runs:
            assert held_lease(store, run_id) is None  # a restore carries no lease
        self.hosts[h] = self._host(directory, store)

    # -- the merged state ------------------------------------------------------------------

    def _check_merged_state(self) -> None:
        rows = query(self.dsn, "select origin, lsn, key from walsync.siblings "
                               "where walsync.run_of(key) = any(%s)", (self.runs,))
        for row in rows:
            assert tuple(row) in self.accepted, row
        entries = query(self.dsn, "select origin, lsn, key from walsync.entries "
                                  "where walsync.run_of(key) = any(%s)", (self.runs,))
        assert {tuple(r) for r in entries} == self.accepted
        fenced = query(self.dsn, "select origin, lsn, key from walsync.fenced "
                                 "where walsync.run_of(key) = any(%s)", (self.runs,))
        assert {tuple(r) for r in fenced} == self.refused


@pytest.mark.parametrize("kind", ["postgres", "supabase"])
def test_random_schedules_merge_only_the_lease_holders_writes(
        kind: str, pg_db: str, pg_gateway: Callable[..., PostgrestGateway]) -> None:
    migrate(pg_db)
    gateway = pg_gateway(schemas=["walsync_api"]) if kind == "supabase" else None

    def transport() -> Transport:
        if gateway is None:
            return PostgresTransport(pg_db, timeout_seconds=10)
        return supabase_transport(gateway)

    class Model(FencingModel):
        pass

    Model.dsn = pg_db
    Model.transport = staticmethod(transport)  # type: ignore[assignment]
    Model.tally = {"merged": 0, "refused": 0, "lost": 0, "stale": 0}
    run_state_machine_as_test(Model, settings=settings(
        max_examples=20 if kind == "postgres" else 10, stateful_step_count=50, deadline=None,
        database=None, suppress_health_check=[HealthCheck.too_slow,
                                               HealthCheck.filter_too_much]))
    # the schedules did exercise each case (counted over every example)
    assert all(Model.tally.values()), Model.tally

