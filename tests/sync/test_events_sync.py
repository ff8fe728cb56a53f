"""Events the sync layer causes, against a real PostgreSQL (tests/pg.py): a pull that
leaves a key with concurrent versions reports a conflict; a write the server fences
reports the lease lost; a blocked subscriber never slows the replicator's wake-up."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from walsync.engine import CommitEvent, ConflictEvent, Event, LeaseLostEvent, Store
from walsync.engine.errors import LeaseLostError
from walsync.engine.workflow import Workflows
from walsync.sync.lease import Leases
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(90)]

RUN_ID = "leased-1"


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    a, b = Store.open(tmp_path / "a"), Store.open(tmp_path / "b")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_events_pull_of_a_concurrent_write_reports_the_conflict(
    pg_db: str, stores: tuple[Store, Store],
) -> None:
    migrate(pg_db)
    a, b = stores
    every_round = ReplicatorOptions(pull_interval_seconds=0)  # each run_once pulls
    rep_a, rep_b = (Replicator(s, PostgresTransport(pg_db), every_round) for s in (a, b))
    try:
        with a.events.subscribe(kinds=("commit", "conflict"), prefix="shared/") as sub_a, \
                b.events.subscribe(kinds=("commit", "conflict"), prefix="shared/") as sub_b:
            a.put("shared/k", "from A")
            b.put("shared/k", "from B")  # neither has seen the other's write
            a.put("shared/calm", "only A")
            rep_a.run_once()  # ships A's writes
            rep_b.run_once()  # ships B's, pulls A's: a conflict on B
            rep_a.run_once()  # pulls B's: the same conflict on A
            got_a = [sub_a.get(timeout_seconds=10) for _ in range(4)]
            got_b = [sub_b.get(timeout_seconds=10) for _ in range(3)]
            assert sub_a.get(timeout_seconds=0.1) is None
            assert sub_b.get(timeout_seconds=0.1) is None
    finally:
        rep_a.close()
        rep_b.close()
    for got, store, local in ((got_a, a, 2), (got_b, b, 1)):
        commits = [e for e in got if isinstance(e, CommitEvent)]
        assert [c.source for c in commits] == ["local"] * local + ["merge"]
        (conflict,) = [e for e in got if isinstance(e, ConflictEvent)]
        assert conflict == ConflictEvent(lsn=commits[-1].lsn, key="shared/k", siblings=2)
        assert got[-1] is conflict  # right after the merge's CommitEvent
        assert {v.value for v in store.get_versions("shared/k")} == {"from A", "from B"}
    assert rep_b.status().conflicts == 1


def test_events_fenced_writes_report_lease_lost_and_wake_stays_immediate(
    pg_db: str, stores: tuple[Store, Store],
) -> None:
    migrate(pg_db)
    a, _ = stores
    rep = Replicator(a, PostgresTransport(pg_db), ReplicatorOptions(
        pull=False, retry_initial_seconds=0.02, retry_max_seconds=0.3)).start()
    leases_a = Leases(PostgresTransport(pg_db), a.node_id, ttl_seconds=30)
    leases_b = Leases(PostgresTransport(pg_db), "host-b", ttl_seconds=30)
    gate = threading.Event()
    blocked: list[Event] = []

    def held(event: Event) -> None:
        gate.wait()
        blocked.append(event)

    hook = a.events.subscribe(held)
    lost = a.events.subscribe(kinds="lease_lost")
    try:
        lease = leases_a.acquire(RUN_ID)
        run = Workflows(a).run("w", RUN_ID, lease=(a.node_id, lease.token))
        with run:
            run.step("s1", lambda: 1)
            # The server acknowledges promptly although a subscriber is stuck:
            # the replicator wakes on commit, not through an event queue.
            started = time.monotonic()
            rep.wait_acknowledged(a.applied_lsn, 10)
            assert time.monotonic() - started < 1.0
            assert lost.get(timeout_seconds=0.05) is None  # its own writes were accepted

            # Another host takes the run over; this one keeps writing with its token.
            leases_a.release(lease)
            taken = leases_b.acquire(RUN_ID)
            assert taken.token > lease.token
            before = a.applied_lsn
            run.step("s2", lambda: 2)
            after = a.applied_lsn
            event = lost.get(timeout_seconds=10)
            # Told, the host refuses its own next writes to the run (the run's
            # completion as the block ends) and names the new holder.
            with pytest.raises(LeaseLostError) as refused:
                run.complete()
        assert a.applied_lsn == after  # nothing was written
        assert (refused.value.holder, refused.value.current_token) == ("host-b", taken.token)
        rep.wait_acknowledged(a.applied_lsn, 10)
        assert blocked == []  # the hook was held the whole time
        assert isinstance(event, LeaseLostEvent)
        assert (event.run_id, event.token, event.current_token, event.holder) == \
            (RUN_ID, lease.token, taken.token, "host-b")
        assert before < event.lsn <= after
        assert lost.get(timeout_seconds=0.1) is None  # once per run
        assert rep.status().lost_runs == {RUN_ID: taken.token}
    finally:
        gate.set()
        hook.close()
        lost.close()
        rep.close()
        leases_a.transport.close()
        leases_b.transport.close()
