"""Host loss, end to end: a host dies half-way through a run, a new host restores
its runs from the server, takes the run's lease after the old one expires and
finishes the run without re-running what was done.

Real processes (host A is a child process, SIGKILLed; host B is this test), a
real PostgreSQL (tests/pg.py), the postgres transport, no mocks.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.sync._hostloss_child import (
    HALF,
    REPLICATOR_OPTIONS,
    STEPS,
    drive,
    expected_outputs,
    one,
    reap,
    spawn,
    step_id,
    wait_json,
)
from walsync.engine import Store
from walsync.engine.errors import LeaseHeldError
from walsync.engine.record import decode_value
from walsync.engine.workflow import RunStatus, StepStatus, Workflows, keys
from walsync.sync.lease import Leases
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator
from walsync.sync.restore import restore

pytestmark = [pytest.mark.postgres, pytest.mark.crash, pytest.mark.timeout(90)]

TTL_SECONDS = 2.0
RUN_ID = "invoice-2026-11-23"


def server_state(dsn: str, key: str) -> dict[str, Any] | None:
    """The winner of ``key`` on the server (walsync.state), value decoded."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "select origin, lsn, fence, deleted, codec, data from walsync.state where key = %s",
            (key,)).fetchone()
    if row is None:
        return None
    origin, lsn, fence, deleted, codec, data = row
    value = None if deleted else decode_value(codec, bytes(data))
    return {"origin": origin, "lsn": lsn, "fence": fence, "value": value}


def test_lost_host_run_is_restored_and_resumed_elsewhere(pg_db: str, tmp_path: Path) -> None:
    migrate(pg_db)
    a_dir, b_dir, out = tmp_path / "host-a", tmp_path / "host-b", tmp_path / "out"
    out.mkdir()
    side = tmp_path / "side-effects.log"  # the outside world: survives the host

    # Host A drives the run half-way, with its writes acknowledged by the server.
    proc = spawn("hostloss", a_dir, side, out, RUN_ID, TTL_SECONDS, dsn=pg_db, log_dir=out)
    try:
        ready = wait_json(out / "ready.json", proc, 30, out / "hostloss.out")
        a_node = ready["node_id"]
        assert ready["acked_lsn"] >= ready["covered_lsn"]
        # The unreplicated tail: step 6's partial progress, committed after the
        # replicator lost the server.
        assert ready["applied_lsn"] > ready["acked_lsn"]
        with psycopg.connect(pg_db) as conn:
            (server_acked,) = one(conn,
                "select acked_lsn from walsync.nodes where node_id = %s", (a_node,))
            (lease_holder, a_token) = one(conn,
                "select holder, token from walsync.leases where run_id = %s",
                (RUN_ID,))
        assert server_acked == ready["acked_lsn"]
        # A's run creation (before its lease, unfenced) was refused by the server, but
        # A holds the lease: nothing told A it lost the run.
        assert ready["lost"] == []
        assert ready["lost_runs"] == {}
        assert ready["stale_refused"] == {RUN_ID: ready["token"]}
        assert (lease_holder, a_token) == (a_node, ready["token"])
    finally:
        reap(proc)  # SIGKILL: host A is gone ...
    assert proc.returncode == -9
    shutil.rmtree(a_dir)  # ... with its disk
    assert side.read_text().split() == [step_id(i) for i in range(1, HALF + 1)]

    transport = PostgresTransport(pg_db)
    at_kill = transport.node_status(a_node)
    assert at_kill.acked_lsn == server_acked

    # Host B: a new store from the server's state of A's runs.
    report = restore(transport, b_dir, lost_node=a_node)
    assert report.lost_node == a_node
    assert report.node_id != a_node
    assert report.resumable_runs == [RUN_ID]
    assert report.lost_node_acked_lsn == at_kill.acked_lsn == ready["acked_lsn"]
    assert report.recovery_point is not None
    assert report.keys >= HALF + 2  # run record, index entry, one record per step

    with Store.open(b_dir, create=False) as store:
        b_node = store.node_id
        assert b_node == report.node_id
        wf = Workflows(store)
        run = wf.get_run(RUN_ID)
        assert run.status == RunStatus.RUNNING
        assert run.record.owner_node == a_node
        statuses = {sid: s.status for sid, s in run.steps.items()}
        assert statuses == {**{step_id(i): StepStatus.SUCCESS for i in range(1, HALF + 1)},
                            step_id(HALF + 1): StepStatus.RUNNING}
        # The tail never reached the server: step 6 has no cursor here.
        assert run.steps[step_id(HALF + 1)].cursor is None

        rep = Replicator(store, transport, REPLICATOR_OPTIONS).start()
        leases = Leases(PostgresTransport(pg_db), b_node, ttl_seconds=TTL_SECONDS)
        try:
            # A's lease is still live for up to a TTL after the kill: B waits it out.
            with psycopg.connect(pg_db) as conn:
                (left,) = one(conn,
                    "select extract(epoch from expires_at - now()) from walsync.leases "
                    "where run_id = %s", (RUN_ID,))
            if left > 0.3:
                with pytest.raises(LeaseHeldError, match=a_node):
                    leases.acquire(RUN_ID)
            lease = leases.acquire(RUN_ID, wait_seconds=15, poll_seconds=0.1)
            assert lease.token > a_token
            leases.keep_alive(lease, on_lost=lambda exc: None)
            run.set_lease(b_node, lease.token)

            with run:
                final = drive(run, side)
            assert [sid for sid, _ in run.interrupted] == [step_id(HALF + 1)]

            # Completed steps did not run again; the rest ran once.
            assert side.read_text().split() == [step_id(i) for i in range(1, STEPS + 1)]
            expected = expected_outputs()
            assert final == expected[step_id(STEPS)]
            assert run.snapshot() == expected
            assert run.status == RunStatus.COMPLETED
            assert run.record.steps_done == STEPS
            assert run.record.progress == 100.0
            assert run.steps[step_id(HALF + 1)].attempts == 2
            assert all(run.steps[step_id(i)].attempts == 1
                       for i in range(1, STEPS + 1) if i != HALF + 1)
            reopened = Workflows(store).get_run(RUN_ID)
            assert reopened.snapshot() == expected
            assert reopened.status == RunStatus.COMPLETED

            # B's writes reach the server, carrying B's token; nothing was fenced.
            rep.wait_acknowledged(store.applied_lsn, 20)
            assert rep.status().lost_runs == {}
            leases.release(lease)
        finally:
            rep.stop()
            leases.transport.close()

    run_row = server_state(pg_db, keys.run(RUN_ID))
    assert run_row is not None
    assert (run_row["origin"], run_row["fence"]) == (b_node, lease.token)
    assert run_row["value"]["status"] == "completed"
    assert run_row["value"]["owner_node"] == b_node
    index_row = server_state(pg_db, keys.index(RUN_ID))
    assert index_row is not None
    assert index_row["origin"] == b_node
    assert index_row["value"]["status"] == "completed"
    for i in range(1, STEPS + 1):
        row = server_state(pg_db, keys.step(RUN_ID, step_id(i)))
        assert row is not None
        assert row["value"]["status"] == "success"
        assert row["origin"] == (a_node if i <= HALF else b_node)
        assert row["value"]["output"] == expected[step_id(i)]
    with psycopg.connect(pg_db) as conn:
        fenced = conn.execute("select origin, key, fence from walsync.fenced").fetchall()
        (b_acked,) = one(conn,
            "select acked_lsn from walsync.nodes where node_id = %s", (b_node,))
    # Only A's unfenced creation of the run was refused; none of B's writes.
    assert sorted(fenced) == [(a_node, keys.index(RUN_ID), 0), (a_node, keys.run(RUN_ID), 0)]
    assert b_acked > 0
    transport.close()

