"""Split brain: a host paused past its lease wakes up and keeps writing a run that
another host took over. Fencing must refuse its writes on the server, the new
holder's state must win everywhere, and the paused host must be told.

Real processes (host A is a child process, SIGSTOPped and SIGCONTed; host B is
this test), a real PostgreSQL (tests/pg.py), no mocks.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.sync._hostloss_child import REPLICATOR_OPTIONS, one, reap, spawn, wait_json
from walsync.engine import Store
from walsync.engine.errors import LeaseLostError, RemoteUnavailableError
from walsync.engine.record import decode_value
from walsync.engine.workflow import Workflows, keys
from walsync.sync.lease import Leases
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport, classify
from walsync.sync.replicator import Replicator

pytestmark = [pytest.mark.postgres, pytest.mark.crash, pytest.mark.timeout(90)]

TTL_SECONDS = 2.0
RUN_ID = "split-1"


def server_winner(conn: psycopg.Connection[Any], key: str) -> dict[str, Any] | None:
    row = conn.execute(
        "select origin, lsn, fence, deleted, codec, data from walsync.state where key = %s",
        (key,)).fetchone()
    if row is None:
        return None
    origin, lsn, fence, deleted, codec, data = row
    return {"origin": origin, "lsn": lsn, "fence": fence,
            "value": None if deleted else decode_value(codec, bytes(data))}


def pulled_up_to_head(rep: Replicator, dsn: str, timeout: float) -> None:
    """Wait until the replicator pulled everything the server had when this was called."""
    with psycopg.connect(dsn) as conn:  # not the replicator's transport: one thread each
        (head,) = one(conn, "select pos from walsync.head")
    deadline = time.monotonic() + timeout
    while rep.status().pull_cursor < head:
        assert time.monotonic() < deadline, f"pull cursor stuck below {head}: {rep.status()}"
        time.sleep(0.05)


def test_paused_holder_is_fenced_and_told(pg_db: str, tmp_path: Path) -> None:
    migrate(pg_db)
    out = tmp_path / "out"
    out.mkdir()
    proc = spawn("splitbrain", tmp_path / "host-a", out, RUN_ID, TTL_SECONDS, dsn=pg_db,
                 log_dir=out)
    store = Store.open(tmp_path / "host-b")
    b_node = store.node_id
    rep = Replicator(store, PostgresTransport(pg_db), REPLICATOR_OPTIONS).start()
    leases = Leases(PostgresTransport(pg_db), b_node, ttl_seconds=TTL_SECONDS)
    try:
        ready = wait_json(out / "ready.json", proc, 30, out / "splitbrain.out")
        a_node, a_token = ready["node_id"], ready["token"]

        # A freezes (a GC pause, a VM suspended, a partition) while driving the run.
        os.kill(proc.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        pulled_up_to_head(rep, pg_db, 10)
        wf = Workflows(store)
        run = wf.get_run(RUN_ID)
        assert run.record.owner_node == a_node

        # B takes the lease once A's has expired (A cannot renew while frozen).
        lease = leases.acquire(RUN_ID, wait_seconds=15, poll_seconds=0.1)
        assert time.monotonic() - stopped_at < TTL_SECONDS + 8
        assert lease.token > a_token
        run.set_lease(b_node, lease.token)
        run.start()
        run.step("b001", lambda: {"by": "B", "i": 1})
        rep.wait_acknowledged(store.applied_lsn, 20)

        # A wakes up and keeps writing with its old token.
        os.kill(proc.pid, signal.SIGCONT)
        report = wait_json(out / "report.json", proc, 60, out / "splitbrain.out")
        proc.wait(timeout=30)
        assert proc.returncode == 0, (out / "splitbrain.out").read_text()

        # B goes on and finishes; then B pulls everything there is.
        run.step("b002", lambda: {"by": "B", "i": 2})
        run.complete()
        rep.wait_acknowledged(store.applied_lsn, 20)
        pulled_up_to_head(rep, pg_db, 10)
        assert rep.status().lost_runs == {}
        b_run = store.get(keys.run(RUN_ID))
        b_index = store.get(keys.index(RUN_ID))
        b_run_siblings = len(store.get_versions(keys.run(RUN_ID)))
        b_keys = set(store.keys(keys.steps(RUN_ID)))
    finally:
        reap(proc)
        rep.stop()
        rep.transport.close()
        leases.transport.close()
        store.close()

    # --- A was told it lost the run, three ways. ---
    assert report["node_id"] == a_node
    assert report["lost_runs"] == {RUN_ID: lease.token}, report
    assert [(e["run_id"], e["current_token"]) for e in report["replicator_lost"]] == \
        [(RUN_ID, lease.token)]
    assert [e["run_id"] for e in report["keepalive_lost"]] == [RUN_ID]
    assert report["renew_error"] is not None
    assert report["renew_error"]["type"] == LeaseLostError.__name__
    assert report["renew_error"]["current_token"] == lease.token
    assert report["all_acked"], report
    # A really kept writing after it knew (at least five writes, plus the run's completion),
    # past its workflow layer, which refused each of them once the replicator was told.
    after = [w for w in report["writes"] if w["lost_known"]]
    assert len(after) >= 5
    assert all(w["refused_locally"] for w in after)
    assert len(report["refusals"]) == \
        sum(w["refused_locally"] for w in report["writes"]) + 1  # and the completion
    for refusal in report["refusals"]:
        assert (refusal["holder"], refusal["current_token"]) == (b_node, lease.token)
        assert "nothing was written" in refusal["message"]

    with psycopg.connect(pg_db) as conn:
        # --- The server refused every write A made with the old token after B took over. ---
        fenced = conn.execute(
            "select lsn, key, run_id, fence, current from walsync.fenced where origin = %s",
            (a_node,)).fetchall()
        accepted = conn.execute(
            "select lsn, key, fence from walsync.entries where origin = %s", (a_node,)).fetchall()
        assert fenced, "no write of A was fenced"
        assert {(r[2], r[3], r[4]) for r in fenced} == {(RUN_ID, a_token, lease.token)}
        fenced_lsns = {r[0] for r in fenced}
        accepted_lsns = {r[0] for r in accepted}
        assert not fenced_lsns & accepted_lsns
        # One cut: everything A wrote before the takeover is in, everything after is out.
        assert max(accepted_lsns) < min(fenced_lsns)
        fenced_keys = {r[1] for r in fenced}
        for w in after:
            assert keys.step(RUN_ID, w["step"]) in fenced_keys
            assert w["lsn"] in fenced_lsns
        assert report["final_lsn"] in fenced_lsns  # the run's completion by A
        # Every write of A is accounted for: accepted or fenced, never both, never lost.
        assert accepted_lsns | fenced_lsns == set(range(min(accepted_lsns),
                                                        report["final_lsn"] + 1))

        # --- B's state wins on the server. ---
        run_row = server_winner(conn, keys.run(RUN_ID))
        index_row = server_winner(conn, keys.index(RUN_ID))
        assert run_row is not None
        assert index_row is not None
        assert (run_row["origin"], run_row["fence"]) == (b_node, lease.token)
        assert (index_row["origin"], index_row["fence"]) == (b_node, lease.token)
        assert run_row["value"] == b_run
        assert run_row["value"]["owner_node"] == b_node
        assert run_row["value"]["status"] == "completed"
        assert index_row["value"] == b_index
        # No key of the run has a winner written by A after the takeover.
        rows = conn.execute(
            "select key, origin, lsn from walsync.state where walsync.run_of(key) = %s",
            (RUN_ID,)).fetchall()
        assert all(lsn in accepted_lsns for _k, origin, lsn in rows if origin == a_node)
        (leased,) = one(conn, "select holder from walsync.leases where run_id = %s",
                        (RUN_ID,))
        assert leased == b_node

    # --- B's store after pulls: B's values, none of A's fenced writes. ---
    assert b_run["owner_node"] == b_node
    assert b_run["status"] == "completed"
    assert b_run_siblings == 1
    for w in after:
        assert keys.step(RUN_ID, w["step"]) not in b_keys
    assert keys.step(RUN_ID, "b001") in b_keys
    assert keys.step(RUN_ID, "b002") in b_keys

    # --- A's own store, after one pull: B's run record wins there too (highest fence). ---
    assert report["local_run_after_pull"]["owner_node"] == b_node
    assert report["local_run_after_pull"]["lease_token"] == lease.token
    assert report["local_run_siblings"] == 2  # A's fenced version stays as a sibling



def catch_in_transaction(proc_pid: int, backend_pid: int, call: str, dsn: str) -> None:
    """SIGSTOP the child until it is frozen inside a transaction holding the call's locks."""
    if call == "renew":
        holds = ("select count(*) from pg_locks where pid = %s and granted and "
                 "locktype = 'relation' and relation = 'walsync.leases'::regclass "
                 "and mode = 'RowExclusiveLock'")
    else:
        holds = ("select count(*) from pg_locks where pid = %s and granted and "
                 "locktype = 'advisory'")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(400):
            os.kill(proc_pid, signal.SIGSTOP)
            time.sleep(0.03)  # let a statement already sent finish on the server
            row = conn.execute("select state from pg_stat_activity where pid = %s",
                               (backend_pid,)).fetchone()
            if row is not None and row[0] == "idle in transaction" and \
                    one(conn, holds, (backend_pid,))[0]:
                return
            os.kill(proc_pid, signal.SIGCONT)
            time.sleep(random.uniform(0.001, 0.02))
    raise AssertionError("never caught the child inside a transaction")


@pytest.mark.parametrize("call", ["renew"])
def test_client_frozen_in_a_transaction_blocks_nobody(pg_db: str, tmp_path: Path,
                                                      call: str) -> None:
    """A host frozen between a call's result and its COMMIT holds that call's locks (the
    run's lease row; the lock every push takes). The server must end its transaction,
    so that other hosts can still take the lease and replicate."""
    migrate(pg_db)
    out = tmp_path / "out"
    out.mkdir()
    proc = spawn("hold", tmp_path / "host-a", out, "held", TTL_SECONDS, call, dsn=pg_db,
                 log_dir=out)
    try:
        ready = wait_json(out / "ready.json", proc, 30, out / "hold.out")
        time.sleep(0.2)
        catch_in_transaction(proc.pid, ready["backend_pid"], call, pg_db)
        started = time.monotonic()
        if call == "renew":
            leases = Leases(PostgresTransport(pg_db, timeout_seconds=10), "host-b",
                            ttl_seconds=TTL_SECONDS)
            try:
                lease = leases.acquire("held", wait_seconds=20, poll_seconds=0.1)
            finally:
                leases.transport.close()
            assert lease.token > ready["token"]
        else:
            with Store.open(tmp_path / "host-b") as store:
                rep = Replicator(store, PostgresTransport(pg_db, timeout_seconds=10),
                                 REPLICATOR_OPTIONS).start()
                try:
                    result = store.put("b/key", "from B")
                    rep.wait_acknowledged(result.lsn, 25)
                finally:
                    rep.stop()
                    rep.transport.close()
        # Bounded by the server's idle-in-transaction limit, not by the frozen host.
        assert time.monotonic() - started < 15
        assert proc.poll() is None  # still frozen

        # Thawed, the host finds its call failed (retryable) and carries on.
        os.kill(proc.pid, signal.SIGCONT)
        resumed = wait_json(out / "resumed.json", proc, 30, out / "hold.out")
        assert resumed["errors"], resumed
        assert resumed["errors"][0].startswith("RemoteUnavailableError")
        if call == "renew":
            assert resumed["lost"] is not None
            assert "now held by host-b" in resumed["lost"]
        else:
            assert resumed["acked_lsn"] == resumed["applied_lsn"]
            with psycopg.connect(pg_db) as conn:
                (pushed,) = one(conn,
                    "select count(*) from walsync.entries where origin = %s",
                    (ready["node_id"],))
            assert pushed == resumed["applied_lsn"]
        proc.wait(timeout=30)
        assert proc.returncode == 0
    finally:
        reap(proc)


def test_client_frozen_anywhere_in_its_pushes_holds_no_push_lock(pg_db: str,
                                                                tmp_path: Path) -> None:
    """A push commits on the server before the client reads its answer (one pipeline:
    PROTOCOL.md, Scaling), so a host frozen at any point of its push loop is never
    caught idle inside a transaction holding a push's locks, and while it stays frozen
    other hosts replicate."""
    migrate(pg_db)
    out = tmp_path / "out"
    out.mkdir()
    proc = spawn("hold", tmp_path / "host-a", out, "held", TTL_SECONDS, "push", dsn=pg_db,
                 log_dir=out)
    holds = ("select count(*) from pg_locks where pid = %s and granted and "
             "locktype = 'advisory'")
    try:
        ready = wait_json(out / "ready.json", proc, 30, out / "hold.out")
        backend = ready["backend_pid"]
        time.sleep(0.2)
        with psycopg.connect(pg_db, autocommit=True) as conn:
            for _ in range(150):
                os.kill(proc.pid, signal.SIGSTOP)
                time.sleep(0.03)  # let a statement already sent finish on the server
                row = conn.execute("select state from pg_stat_activity where pid = %s",
                                   (backend,)).fetchone()
                caught = row is not None and row[0] == "idle in transaction" and \
                    one(conn, holds, (backend,))[0]
                assert not caught, "a frozen pusher holds a push's locks in a transaction"
                os.kill(proc.pid, signal.SIGCONT)
                time.sleep(random.uniform(0.001, 0.02))
            (pushed,) = one(conn, "select count(*) from walsync.entries where origin = %s",
                            (ready["node_id"],))
        assert pushed > 0  # it was pushing all along
        os.kill(proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        with Store.open(tmp_path / "host-b") as store:
            rep = Replicator(store, PostgresTransport(pg_db, timeout_seconds=10),
                             REPLICATOR_OPTIONS).start()
            try:
                result = store.put("b/key", "from B")
                rep.wait_acknowledged(result.lsn, 25)
            finally:
                rep.stop()
                rep.transport.close()
        assert time.monotonic() - started < 15
        assert proc.poll() is None  # still frozen
    finally:
        reap(proc)


def test_session_ended_for_idling_in_a_transaction_is_retryable(pg_db: str) -> None:
    """A process paused (GC, VM) between a call's result and its COMMIT finds, when it
    wakes up, that the server ended its session (SQLSTATE 25P03): a transient error
    that the replicator retries, not a permanent refusal that stops it."""
    error: psycopg.Error | None = None
    with psycopg.connect(pg_db, autocommit=True) as conn:
        try:
            with conn.transaction():
                conn.execute("set local idle_in_transaction_session_timeout = 100")
                conn.execute("select 1").fetchone()
                time.sleep(0.5)  # frozen between the result and the COMMIT
        except psycopg.Error as exc:
            error = exc
    assert error is not None, "the server did not end the idle transaction"
    assert error.sqlstate == "25P03"
    assert isinstance(classify(error, "push"), RemoteUnavailableError)
