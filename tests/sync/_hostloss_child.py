"""Child processes for the host-loss suites (tests/sync/test_hostloss_*.py).

The PostgreSQL DSN comes from ``$WALSYNC_TEST_DSN`` (never the command line).
A child reports by writing JSON files atomically (tmp + fsync + rename) into
its OUT directory; the parent polls for them, SIGKILLs / SIGSTOPs the child.

    python tests/sync/_hostloss_child.py hostloss STORE SIDE OUT RUN_ID TTL
        host A of the restore test: creates run RUN_ID, takes its lease (TTL
        seconds, kept alive; run.set_lease), starts a replicator, drives the STEPS-step workflow
        (each body appends its step id to the fsynced side-effect file SIDE).
        Inside step 6's body (before its side effect) it waits until the
        server acknowledged everything so far (steps 1-5 done, step 6
        running), stops the replicator (the network to the server is gone
        from here on), records partial progress of step 6 locally (the
        unreplicated tail), writes OUT/ready.json and sleeps until killed.

    python tests/sync/_hostloss_child.py splitbrain STORE OUT RUN_ID TTL
        host A of the split-brain test: takes run RUN_ID's lease (kept
        alive; on_lost recorded), creates the run under it, starts a
        replicator (no pulls, so nothing but the server tells it about the
        takeover) with an on_lease_lost
        callback, and writes steps a000, a001, ... of the run every 50 ms
        with its lease token. OUT/ready.json once a few writes are on the
        server. Once the workflow layer refuses its writes (LeaseLostError:
        the replicator was told), it goes on as a zombie that bypasses it,
        putting the step keys with its old token. It keeps writing until
        both the keep-alive and the replicator reported the loss and 5 more
        writes followed, completes the run (a zombie put of the run record
        when refused), waits until the server acknowledged every write,
        tries one more renew, pulls once, and writes OUT/report.json.

    python tests/sync/_hostloss_child.py hold STORE OUT RUN_ID TTL CALL
        calls the server in a tight loop (CALL: ``renew`` the run's lease,
        or ``push`` records of a store through a replicator) so that a
        SIGSTOP is likely to catch it between a call's result and its
        COMMIT; writes OUT/ready.json with its backend pid first. Once
        resumed, it writes OUT/resumed.json (the errors it saw, and whether
        it was told it lost the lease) after the next successful push, or
        when a renew says the lease was lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from walsync.engine import Put, Store
from walsync.engine.errors import LeaseLostError, RemoteUnavailableError
from walsync.engine.workflow import (
    Run,
    StepRecord,
    StepStatus,
    Workflows,
    current_step,
    keys,
)
from walsync.sync.lease import Leases
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions

DSN_ENV = "WALSYNC_TEST_DSN"
WORKFLOW = "hostloss"
STEPS = 10
HALF = 5
#: the replicator's settings in every child: quick retries, quick pulls
REPLICATOR_OPTIONS = ReplicatorOptions(pull_interval_seconds=0.2, retry_initial_seconds=0.02,
                                       retry_max_seconds=0.3)


def step_id(i: int) -> str:
    return f"s{i:02d}"


def chain_output(prev: str, i: int) -> str:
    return hashlib.sha256(f"{prev}|{i}".encode()).hexdigest()[:16]


def expected_outputs() -> dict[str, str]:
    out, prev = {}, "seed"
    for i in range(1, STEPS + 1):
        prev = chain_output(prev, i)
        out[step_id(i)] = prev
    return out


def side_effect(path: Path, line: str) -> None:
    """Append one line and fsync it: the outside world's record of what ran."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, doc: Any) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def drive(run: Run, side: Path, hook: Any = None) -> str:
    """The workflow: STEPS chained steps, each appending its id to ``side``."""

    def body(i: int, prev: str) -> str:
        if hook is not None:
            hook(i)
        side_effect(side, step_id(i))
        return chain_output(prev, i)

    prev = "seed"
    for i in range(1, STEPS + 1):
        prev = run.step(step_id(i), body, i, prev)
    return prev


def dsn() -> str:
    return os.environ[DSN_ENV]


# -- for the parent ----------------------------------------------------------------------

def one(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> Any:
    """The only row of a query that must return one."""
    row = conn.execute(query, params).fetchone()
    assert row is not None, f"no row: {query} {params}"
    return row

CHILD = Path(__file__).resolve()
REPO_ROOT = CHILD.parents[2]


def spawn(mode: str, *args: object, dsn: str, log_dir: Path) -> subprocess.Popen[bytes]:
    """Start a child; its stdout and stderr go to files in ``log_dir``."""
    env = dict(os.environ, **{DSN_ENV: dsn})
    out = open(log_dir / f"{mode}.out", "ab")  # noqa: SIM115 - closed with the process
    try:
        return subprocess.Popen([sys.executable, str(CHILD), mode, *map(str, args)],
                                cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


def wait_json(path: Path, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> Any:
    """The JSON a child writes to ``path``; fails if it exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) before writing "
                                 f"{path.name}:\n{log.read_text(errors='replace')[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"child did not write {path.name} in {timeout} s")
        time.sleep(0.02)
    return json.loads(path.read_text())


def reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill (if still running, resuming it first if stopped) and wait."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
            os.kill(proc.pid, signal.SIGCONT)
    proc.wait(timeout=30)


# -- modes -------------------------------------------------------------------------------

def hostloss(store_path: str, side: str, out: str, run_id: str, ttl: float) -> int:
    out_dir = Path(out)
    store = Store.open(store_path)
    leases = Leases(PostgresTransport(dsn()), store.node_id, ttl_seconds=ttl)
    wf = Workflows(store)
    # The run is created first and leased afterwards (its creation is unfenced);
    # the replicator starts after the lease, so the creation reaches the server
    # after the lease was taken: the server refuses it, and the replicator must
    # not take that for a lost run (this host holds the lease).
    run = wf.run(WORKFLOW, run_id, total_steps=STEPS)
    lease = leases.acquire(run_id)
    run.set_lease(store.node_id, lease.token)
    rep = Replicator(store, PostgresTransport(dsn()), REPLICATOR_OPTIONS).start()
    lost: list[str] = []
    rep.on_lease_lost(lambda exc: lost.append(exc.run_id))
    leases.keep_alive(lease, on_lost=lambda exc: lost.append(exc.run_id))

    def hook(i: int) -> None:
        if i != HALF + 1:
            return
        # Steps 1..5 are done and step 6 is marked running: wait until the
        # server has all of it, then lose the network and write a local tail.
        upto = store.applied_lsn
        rep.wait_acknowledged(upto, 20.0)
        rep.stop()
        acked = rep.acked_lsn
        status = rep.status()
        current_step().progress(0.5, cursor={"tail": "never replicated"})
        write_json(out_dir / "ready.json", {
            "node_id": store.node_id, "pid": os.getpid(), "token": lease.token,
            "acked_lsn": acked, "covered_lsn": upto, "applied_lsn": store.applied_lsn,
            "lost": lost, "lost_runs": status.lost_runs,
            "stale_refused": status.stale_refused,
        })
        time.sleep(600)

    with run:
        drive(run, Path(side), hook)
    return 1  # never reached: the parent kills this process


def splitbrain(store_path: str, out: str, run_id: str, ttl: float) -> int:
    out_dir = Path(out)
    store = Store.open(store_path)
    rep = Replicator(store, PostgresTransport(dsn()), ReplicatorOptions(
        pull=False, retry_initial_seconds=0.02, retry_max_seconds=0.3)).start()
    leases = Leases(PostgresTransport(dsn()), store.node_id, ttl_seconds=ttl)
    lock = threading.Lock()
    keepalive_lost: list[dict[str, Any]] = []
    replicator_lost: list[dict[str, Any]] = []

    def note(into: list[dict[str, Any]]) -> Any:
        def callback(exc: LeaseLostError) -> None:
            with lock:
                into.append({"run_id": exc.run_id, "current_token": exc.current_token,
                             "message": str(exc), "at": time.time()})
        return callback

    rep.on_lease_lost(note(replicator_lost))
    # Lease first, then the run is created under it: every write carries the token.
    lease = leases.acquire(run_id)
    run = Workflows(store).run("split", run_id, lease=(store.node_id, lease.token))
    leases.keep_alive(lease, on_lost=note(keepalive_lost))

    writes: list[dict[str, Any]] = []
    refusals: list[dict[str, Any]] = []
    ready = False
    after_lost = 0
    deadline = time.monotonic() + 45

    def refused(exc: LeaseLostError) -> None:
        refusals.append({"holder": exc.holder, "current_token": exc.current_token,
                         "message": str(exc), "lsn": store.applied_lsn})

    run.start()
    i = 0
    while time.monotonic() < deadline:
        sid = f"a{i:03d}"
        with lock:
            lost = bool(keepalive_lost) and bool(replicator_lost)
        try:
            run.step(sid, lambda i=i: {"by": "A", "i": i})
            local_refusal = False
        except LeaseLostError as exc:
            # The workflow layer refuses: a zombie that bypasses it writes on with
            # its old token, for the server to refuse.
            refused(exc)
            local_refusal = True
            store.commit([Put(keys.step(run_id, sid),
                              StepRecord(sid, StepStatus.SUCCESS.value,
                                         output={"by": "A", "i": i}, seq=i).to_dict(),
                              fence=lease.token)], internal=True)
        lsn = store.applied_lsn
        writes.append({"step": sid, "lsn": lsn, "at": time.time(), "lost_known": lost,
                       "refused_locally": local_refusal})
        if lost:
            after_lost += 1
            if after_lost >= 5:
                break
        if not ready and i >= 3:
            rep.wait_acknowledged(lsn, 20.0)
            write_json(out_dir / "ready.json", {
                "node_id": store.node_id, "pid": os.getpid(), "token": lease.token})
            ready = True
        i += 1
        time.sleep(0.05)
    # The run's completion: one more write with the old token.
    try:
        run.complete()
    except LeaseLostError as exc:
        refused(exc)
        store.commit([Put(keys.run(run_id), {**run.record.to_dict(), "status": "completed"},
                          fence=lease.token)], internal=True)
    final_lsn = store.applied_lsn
    try:
        rep.wait_acknowledged(final_lsn, 15.0)
        all_acked = True
    except Exception:  # noqa: BLE001 - reported to the parent
        all_acked = False
    try:
        leases.renew(lease)
        renew_error = None
    except LeaseLostError as exc:
        renew_error = {"type": type(exc).__name__, "current_token": exc.current_token,
                       "message": str(exc)}
    status = rep.status()
    rep.stop()
    pulled = rep.pull()
    run_versions = store.get_versions(keys.run(run_id))
    write_json(out_dir / "report.json", {
        "node_id": store.node_id, "token": lease.token, "writes": writes,
        "final_lsn": final_lsn, "all_acked": all_acked, "acked_lsn": status.acked_lsn,
        "lost_runs": status.lost_runs, "fenced_runs": status.fenced_runs,
        "replicator_lost": replicator_lost, "keepalive_lost": keepalive_lost,
        "renew_error": renew_error, "pulled_after": pulled, "refusals": refusals,
        "local_run_after_pull": store.get(keys.run(run_id)),
        "local_run_siblings": len(run_versions),
        "last_error": status.last_error, "stopped_reason": status.stopped_reason,
    })
    store.close()
    return 0


def hold(store_path: str, out: str, run_id: str, ttl: float, call: str) -> int:
    out_dir = Path(out)
    store = Store.open(store_path)
    transport = PostgresTransport(dsn())
    transport.node_status(store.node_id)  # connects
    conn = transport._connection()
    pid = conn.info.backend_pid
    leases = Leases(transport, store.node_id, ttl_seconds=ttl)
    lease = leases.acquire(run_id)
    rep = Replicator(store, transport, ReplicatorOptions(pull=False, batch_wait_seconds=0))
    write_json(out_dir / "ready.json", {"node_id": store.node_id, "pid": os.getpid(),
                                        "backend_pid": pid, "token": lease.token})
    n = 0
    errors: list[str] = []
    while True:
        try:
            if call == "renew":
                lease = leases.renew(lease)
            else:
                store.put(f"hold/{n}", n)
                rep.ship()
        except RemoteUnavailableError as exc:
            # Resumed after the server ended the frozen transaction: its COMMIT failed.
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        except LeaseLostError as exc:
            write_json(out_dir / "resumed.json", {"errors": errors, "lost": str(exc)})
            return 0
        n += 1
        if errors:
            write_json(out_dir / "resumed.json", {
                "errors": errors, "lost": None, "acked_lsn": rep.acked_lsn,
                "applied_lsn": store.applied_lsn})
            return 0

def main(argv: list[str]) -> int:
    mode, *args = argv
    if mode == "hostloss":
        return hostloss(args[0], args[1], args[2], args[3], float(args[4]))
    if mode == "splitbrain":
        return splitbrain(args[0], args[1], args[2], float(args[3]))
    if mode == "hold":
        return hold(args[0], args[1], args[2], float(args[3]), args[4])
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
