"""Fencing by holder: a leased run's writes count only from the host that acquired its
lease, with that acquisition's token. Never with a token read from a pulled or restored
run record: the workflow layer refuses such a write (LeaseLostError), and the server
refuses what gets past it (kept in walsync.fenced, the writer's replicator told).

Against a real PostgreSQL (tests/pg.py), through both transports (postgres, and supabase
via the PostgREST-compatible gateway; the push path differs), and through the tenant-mode
push for the server rules. Lease expiry is real time passing on the database's clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gateway import PostgrestGateway
from tests.sync._helpers import entry, query, supabase_transport
from walsync.engine import LeaseLostEvent, Put, Store
from walsync.engine.errors import ConflictError, LeaseLostError, WorkflowError
from walsync.engine.record import decode_value
from walsync.engine.workflow import StepRecord, StepStatus, Workflows, held_lease, keys
from walsync.sync.lease import Leases
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.restore import restore
from walsync.sync.transport import FencedRun, Transport

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

RUN = "fenced-run"
#: synchronous replicators (ship and pull called by the test)
OPTIONS = ReplicatorOptions(batch_wait_seconds=0, retry_initial_seconds=0.02,
                            retry_max_seconds=0.3)


class Remote:
    """One migrated database, reached through the transport under test."""

    def __init__(self, kind: str, dsn: str, gateway: PostgrestGateway | None) -> None:
        self.kind = kind
        self.dsn = dsn
        self.gateway = gateway
        self.opened: list[Transport] = []

    def transport(self) -> Transport:
        t: Transport
        if self.gateway is None:
            t = PostgresTransport(self.dsn, timeout_seconds=10)
        else:
            t = supabase_transport(self.gateway)
        self.opened.append(t)
        return t

    def close(self) -> None:
        for t in self.opened:
            t.close()


@pytest.fixture(params=["postgres", "supabase"])
def remote(request: pytest.FixtureRequest, pg_db: str,
           pg_gateway: Callable[..., PostgrestGateway]) -> Iterator[Remote]:
    migrate(pg_db)
    gateway = pg_gateway(schemas=["walsync_api"]) if request.param == "supabase" else None
    r = Remote(request.param, pg_db, gateway)
    try:
        yield r
    finally:
        r.close()


def fenced_rows(dsn: str, origin: str) -> list[tuple[Any, ...]]:
    return query(dsn, "select key, fence, current, holder from walsync.fenced "
                      "where origin = %s order by lsn, key", (origin,))


def run_entries(dsn: str, origin: str) -> list[tuple[Any, ...]]:
    return query(dsn, "select key, fence from walsync.entries where origin = %s "
                      "and walsync.run_of(key) = %s order by lsn, key", (origin, RUN))


def step_record(step_id: str, output: Any) -> dict[str, Any]:
    """A successful step's record, as a host writing around the workflow layer puts it."""
    return StepRecord(step_id, StepStatus.SUCCESS.value, output=output).to_dict()


def winner(dsn: str, key: str) -> tuple[str, int, Any] | None:
    rows = query(dsn, "select origin, fence, deleted, codec, data from walsync.state "
                      "where key = %s", (key,))
    if not rows:
        return None
    origin, fence, deleted, codec, data = rows[0]
    return origin, fence, None if deleted else decode_value(codec, bytes(data))


def test_a_restored_host_without_the_lease_is_refused_locally_and_by_the_server(
        remote: Remote, tmp_path: Path) -> None:
    """Host A drives a run under a live lease; host B restores A's runs (lost_node=A),
    opens the run without taking the lease and writes: refused here, refused there."""
    a = Store.open(tmp_path / "a")
    rep_a = Replicator(a, remote.transport(), OPTIONS)
    leases_a = Leases(remote.transport(), store=a, ttl_seconds=2.0)
    lease_a = leases_a.acquire(RUN)
    run_a = Workflows(a).run("w", RUN, lease=lease_a)
    run_a.start()
    run_a.step("s1", lambda: "by A")
    rep_a.ship()
    assert run_a.fence == lease_a.token

    report = restore(remote.transport(), tmp_path / "b", lost_node=a.node_id)
    assert report.resumable_runs == [RUN]
    b = Store.open(tmp_path / "b", create=False)
    rep_b = Replicator(b, remote.transport(), OPTIONS)
    lost = b.events.subscribe(kinds="lease_lost")
    try:
        run_b = Workflows(b).get_run(RUN)
        assert (run_b.record.owner_node, run_b.record.lease_token) == (a.node_id, lease_a.token)
        assert run_b.fence == 0  # the record's token is A's, never B's
        before = b.applied_lsn

        # Locally: every way of writing the run without B's own lease is refused.
        with pytest.raises(LeaseLostError) as info:
            run_b.step("s2", lambda: "by B")
        err = info.value
        assert (err.run_id, err.holder, err.current_token) == (RUN, a.node_id, lease_a.token)
        assert "nothing was written" in str(err)
        assert "acquire" in err.hint
        with pytest.raises(LeaseLostError), Workflows(b).run("w", RUN) as again:
            again.step("s2", lambda: "by B")
        with pytest.raises(LeaseLostError, match="without having acquired it"):
            run_b.set_lease(b.node_id, lease_a.token)  # the token copied from the record
        with pytest.raises(WorkflowError, match="not by this store's node"):
            run_b.set_lease(a.node_id, lease_a.token)
        assert held_lease(b, RUN) is None
        assert b.applied_lsn == before

        # On the server: B writes around the workflow layer with the copied token.
        with b.batch(fence=lease_a.token, internal=True) as batch:
            batch.put(keys.step(RUN, "s2"), step_record("s2", "by B"))
            batch.put(keys.run(RUN), {**run_b.record.to_dict(), "status": "completed"})
        rep_b.ship()
        assert rep_b.acked_lsn == b.applied_lsn
        assert fenced_rows(remote.dsn, b.node_id) == [
            (keys.run(RUN), lease_a.token, lease_a.token, a.node_id),
            (keys.step(RUN, "s2"), lease_a.token, lease_a.token, a.node_id)]
        assert run_entries(remote.dsn, b.node_id) == []
        assert winner(remote.dsn, keys.step(RUN, "s2")) is None
        run_row = winner(remote.dsn, keys.run(RUN))
        assert run_row is not None
        assert (run_row[0], run_row[2]["status"]) == (a.node_id, "running")
        # ... and B is told.
        assert rep_b.status().lost_runs == {RUN: lease_a.token}
        event = lost.get(timeout_seconds=5)
        assert isinstance(event, LeaseLostEvent)
        assert (event.run_id, event.token, event.current_token, event.holder) == \
            (RUN, lease_a.token, lease_a.token, a.node_id)
        assert event.lsn == b.applied_lsn

        # B takes the run over the right way once A's lease expired (A stopped renewing).
        leases_b = Leases(remote.transport(), store=b, ttl_seconds=30)
        lease_b = leases_b.acquire(RUN, wait_seconds=15, poll_seconds=0.1)
        assert (lease_b.holder, lease_b.token) == (b.node_id, lease_a.token + 1)
        resumed = Workflows(b).get_run(RUN)
        assert resumed.fence == lease_b.token
        resumed.step("s3", lambda: "by B, leased")
        rep_b.ship()
        assert set(run_entries(remote.dsn, b.node_id)) == {
            (keys.run(RUN), lease_b.token), (keys.step(RUN, "s3"), lease_b.token),
            (keys.index(RUN), lease_b.token)}
        taken = winner(remote.dsn, keys.run(RUN))
        assert taken is not None
        assert (taken[0], taken[1], taken[2]["owner_node"]) == \
            (b.node_id, lease_b.token, b.node_id)
        assert len(fenced_rows(remote.dsn, b.node_id)) == 2  # nothing new refused
        # A, paused past its lease, wakes up: once it pulled B's record, it refuses its
        # own writes to the run (its token is older than the record's).
        rep_a.pull()
        with pytest.raises(LeaseLostError, match="was taken over by") as late:
            Workflows(a).get_run(RUN).step("s4", lambda: "by A, late")
        assert (late.value.holder, late.value.current_token) == (b.node_id, lease_b.token)
    finally:
        lost.close()
        b.close()
        a.close()


def test_a_holder_taken_over_cannot_write_with_its_old_run_or_the_new_token(
        remote: Remote, tmp_path: Path) -> None:
    """X's lease expires, Y takes the run (token 2) and writes; X, after pulling, writes
    through its old in-memory run, through the run reloaded, and around the workflow
    layer with Y's token: lease errors here, refusals there, X's replicator reports."""
    x, y = Store.open(tmp_path / "x"), Store.open(tmp_path / "y")
    rep_x = Replicator(x, remote.transport(), OPTIONS)
    rep_y = Replicator(y, remote.transport(), OPTIONS)
    lost = x.events.subscribe(kinds="lease_lost")
    try:
        lease_x = Leases(remote.transport(), store=x, ttl_seconds=1.0).acquire(RUN)
        run_x = Workflows(x).run("w", RUN, lease=lease_x)
        run_x.start()
        run_x.step("x1", lambda: "by X")
        rep_x.ship()

        rep_y.pull()
        lease_y = Leases(remote.transport(), store=y, ttl_seconds=60).acquire(
            RUN, wait_seconds=10, poll_seconds=0.05)
        assert lease_y.token == lease_x.token + 1
        run_y = Workflows(y).run("w", RUN, lease=lease_y)
        run_y.step("y1", lambda: "by Y")
        rep_y.ship()
        assert run_entries(remote.dsn, y.node_id)  # Y's writes are in

        rep_x.pull()
        before = x.applied_lsn
        # The old in-memory run: a lease error (naming Y), not a raw ConflictError.
        with pytest.raises(LeaseLostError) as info:
            run_x.step("x2", lambda: "by X, late")
        assert (info.value.holder, info.value.current_token) == (y.node_id, lease_y.token)
        assert isinstance(info.value.__cause__, ConflictError)
        # Reloaded after the pull: the record names Y's token, X writes with its own only.
        reloaded = Workflows(x).get_run(RUN)
        assert (reloaded.record.owner_node, reloaded.record.lease_token) == \
            (y.node_id, lease_y.token)
        assert reloaded.fence == lease_x.token
        with pytest.raises(LeaseLostError, match="was taken over by"):
            reloaded.step("x2", lambda: "by X, late")
        with pytest.raises(LeaseLostError):
            reloaded.complete()
        assert x.applied_lsn == before

        # Around the workflow layer: Y's token copied from the pulled record, and X's own.
        x.commit([Put(keys.step(RUN, "x2"), step_record("x2", "by X"), fence=lease_y.token)],
                 internal=True)
        x.commit([Put(keys.step(RUN, "x3"), step_record("x3", "by X"), fence=lease_x.token)],
                 internal=True)
        rep_x.ship()
        assert fenced_rows(remote.dsn, x.node_id) == [
            (keys.step(RUN, "x2"), lease_y.token, lease_y.token, y.node_id),
            (keys.step(RUN, "x3"), lease_x.token, lease_y.token, y.node_id)]
        assert winner(remote.dsn, keys.step(RUN, "x2")) is None
        assert winner(remote.dsn, keys.step(RUN, "x3")) is None
        run_row = winner(remote.dsn, keys.run(RUN))
        assert run_row is not None
        assert run_row[:2] == (y.node_id, lease_y.token)
        assert rep_x.status().lost_runs == {RUN: lease_y.token}
        event = lost.get(timeout_seconds=5)
        assert isinstance(event, LeaseLostEvent)
        assert (event.run_id, event.current_token, event.holder) == \
            (RUN, lease_y.token, y.node_id)
        assert lost.get(timeout_seconds=0.05) is None  # once per lease
        # Told, X no longer has a lease of its own on the run.
        assert held_lease(x, RUN) is None
        with pytest.raises(LeaseLostError, match=y.node_id):
            Workflows(x).get_run(RUN).step("x4", lambda: "by X")
    finally:
        lost.close()
        x.close()
        y.close()


# -- the server's rule, call by call ------------------------------------------------------


@pytest.fixture(params=["postgres", "supabase", "tenant"])
def pusher(request: pytest.FixtureRequest, pg_db: str,
           pg_gateway: Callable[..., PostgrestGateway]) -> Iterator[Transport]:
    """A transport to a migrated database (tenant: tenant mode, the tenant-mode push)."""
    migrate(pg_db, tenant_mode=request.param == "tenant")
    t: Transport
    if request.param == "supabase":
        t = supabase_transport(pg_gateway(schemas=["walsync_api"]))
    else:
        t = PostgresTransport(pg_db, timeout_seconds=10)
    try:
        yield t
    finally:
        t.close()


def fenced(e: dict[str, Any], token: int) -> dict[str, Any]:
    return {**e, "fence": token}


def test_push_accepts_a_leased_runs_entries_from_the_holder_with_its_token_only(
        pusher: Transport, pg_db: str) -> None:
    t = pusher
    got = t.lease_acquire("r", "n1", 600)
    assert (got.holder, got.token) == ("n1", 1)
    # the holder with its token: in
    ack = t.push("n1", 1, [fenced(entry("n1", 1, "runs/r", "n1's"), 1)])
    assert (ack.inserted, ack.fenced) == (1, [])
    # another node: out, whatever it carries (none, the holder's token, a bigger one)
    for lsn, token in ((1, 0), (2, 1), (3, 2)):
        ack = t.push("n2", lsn, [fenced(entry("n2", lsn, f"runs/r/steps/s{lsn}", "n2's"),
                                        token)])
        assert (ack.inserted, ack.fenced) == (0, [FencedRun("r", 1, "n1")])
    # the holder itself: its unfenced write and a token never handed out are out
    ack = t.push("n1", 3, [entry("n1", 2, "index/runs/r", "unfenced"),
                           fenced(entry("n1", 3, "runs/r/steps/big", "big"), 5)])
    assert (ack.inserted, ack.fenced) == (0, [FencedRun("r", 1, "n1")])
    # other keys are not a run's: fencing leaves them alone
    assert t.push("n2", 4, [entry("n2", 4, "runsx/r", "free")]).inserted == 1
    assert query(pg_db, "select origin, key, fence, current, holder from walsync.fenced "
                        "order by origin, lsn") == [
        ("n1", "index/runs/r", 0, 1, "n1"), ("n1", "runs/r/steps/big", 5, 1, "n1"),
        ("n2", "runs/r/steps/s1", 0, 1, "n1"), ("n2", "runs/r/steps/s2", 1, 1, "n1"),
        ("n2", "runs/r/steps/s3", 2, 1, "n1")]


def test_push_after_expiry_keeps_the_last_holder_until_a_takeover(
        pusher: Transport, pg_db: str) -> None:
    t = pusher
    t.lease_acquire("r", "n1", 0.2)
    accepted = [fenced(entry("n1", 1, "runs/r", "v1"), 1)]
    assert t.push("n1", 1, accepted).inserted == 1
    time.sleep(0.3)  # the database's clock passes the lease's expiry
    assert t.leases()[0].live is False
    # expired, nobody took it: the last holder's writes still count, nobody else's
    assert t.push("n1", 2, [fenced(entry("n1", 2, "runs/r", "v2", {"n1": 2}), 1)]).inserted == 1
    ack = t.push("n2", 1, [entry("n2", 1, "runs/r/steps/x", "n2's")])
    assert (ack.inserted, ack.fenced) == (0, [FencedRun("r", 1, "n1")])
    # n2 takes it over: token 2; from then on n1's writes are out, with any token
    got = t.lease_acquire("r", "n2", 600)
    assert (got.acquired, got.token) == (True, 2)
    ack = t.push("n1", 3, [fenced(entry("n1", 3, "runs/r", "v3", {"n1": 3}), 1)])
    assert (ack.inserted, ack.fenced) == (0, [FencedRun("r", 2, "n2")])
    assert t.push("n2", 2, [fenced(entry("n2", 2, "runs/r", "n2 v", {"n1": 2, "n2": 2}),
                                   2)]).inserted == 1
    # a re-sent batch the server had already merged is a duplicate, never refused later
    again = t.push("n1", 1, accepted)
    assert (again.inserted, again.fenced) == (0, [])
    assert query(pg_db, "select origin, lsn, key from walsync.fenced order by origin, lsn") == [
        ("n1", 3, "runs/r"), ("n2", 1, "runs/r/steps/x")]
    assert query(pg_db, "select origin, lsn, fence from walsync.state where key = 'runs/r'") == [
        ("n2", 2, 2)]


def test_a_run_nobody_leased_is_no_ones_and_its_first_lease_tops_its_tokens(
        pusher: Transport, pg_db: str) -> None:
    t = pusher
    assert t.push("n1", 1, [entry("n1", 1, "runs/free", "from n1")]).fenced == []
    assert t.push("n2", 1, [entry("n2", 1, "runs/free", "from n2")]).fenced == []
    # concurrent writes: siblings, by their version vectors
    assert query(pg_db, "select origin from walsync.siblings where key = 'runs/free' "
                        "order by origin") == [("n1",), ("n2",)]
    # a token on a run the server holds no lease of (say, re-shipped to a database
    # restored from an older backup): no evidence against it, merged too
    ack = t.push("n1", 2, [fenced(entry("n1", 2, "runs/free", "re-shipped",
                                        {"n1": 2, "n2": 1}), 7)])
    assert (ack.merged, ack.fenced) == (1, [])
    assert query(pg_db, "select origin, lsn, fence from walsync.state "
                        "where key = 'runs/free'") == [("n1", 2, 7)]
    # the run's first lease here starts above the tokens its record carries ...
    got = t.lease_acquire("free", "n2", 600)
    assert (got.acquired, got.token) == (True, 8)
    ack = t.push("n1", 3, [fenced(entry("n1", 3, "runs/free", "late", {"n1": 3, "n2": 1}), 7)])
    assert (ack.inserted, ack.fenced) == (0, [FencedRun("free", 8, "n2")])
    # ... and so does a takeover from a lease row older than the record (a restored
    # database), while a holder taking its own lease again keeps its token
    query(pg_db, "update walsync.leases set token = 2, expires_at = now() "
                 "where run_id = 'free' returning 1")
    again = t.lease_acquire("free", "n2", 600)
    assert (again.acquired, again.token) == (True, 2)
    query(pg_db, "update walsync.leases set expires_at = now() where run_id = 'free' "
                 "returning 1")
    taken = t.lease_acquire("free", "n3", 600)
    assert (taken.acquired, taken.token) == (True, 8)
