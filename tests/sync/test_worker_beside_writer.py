"""The sync worker beside a live writer, both SIGKILLed at random, on real PostgreSQL.

One process writes: the orchestrator (tests/sync/_worker_child.py) embeds the store
without a replicator of its own and drives a workflow's steps, putting a key per step
(every fourth with durability ``remote``). Another syncs the same store: `walsync
sync`, the worker (engine/worker.py), shipping from the WAL as a reader and handing
what it pulls to the writer through the inbox (engine/handoff.py). A third node, in
this process, writes keys the worker pulls. Rounds of a seeded random schedule start
what is not running and SIGKILL the orchestrator, the worker or both at a random
moment. Then:

* every write the orchestrator was told is durable reaches the server exactly once
  (one entry per key, none of another node's keys pushed back), and every ``remote``
  one was on the server at the moment the orchestrator logged it (checked after each
  round, the worker dead or alive);
* the third node's writes appear in the orchestrator's store while both processes
  run, each merged by exactly one merge record of its WAL;
* no step whose success was recorded ran again;
* both made progress: the server's acknowledgement of the node grew, and the
  orchestrator's steps went on, while the worker ran.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.pg import PostgresCluster
from tests.sync._helpers import wait_for
from tests.sync._servers import Server, server_factory
from walsync.engine import Store
from walsync.engine.handoff import inbox_pages, sync_holder_pid
from walsync.engine.record import KIND_MERGE, decode_entry
from walsync.sync.replicator import Replicator, ReplicatorOptions

pytestmark = pytest.mark.postgres

CHILD = Path(__file__).with_name("_worker_child.py")
REPO = CHILD.parents[2]
WALSYNC = Path(sys.executable).with_name("walsync")


@pytest.fixture
def servers(pg_cluster: PostgresCluster) -> Iterator[Callable[[str], Server]]:
    yield from server_factory(pg_cluster)


class Processes:
    """The orchestrator and the worker of one store, started and killed by the test."""

    def __init__(self, store: Path, log: Path, server: Server, tmp: Path) -> None:
        self.store, self.log, self.tmp = store, log, tmp
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(
            ("WALSYNC_", "SUPABASE_"))}
        self.env.update({k: v for k, v in server.env().items() if v is not None})
        self.orchestrator: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self._outputs = 0

    def _output(self, name: str) -> int:
        self._outputs += 1
        return os.open(self.tmp / f"{name}.{self._outputs}.out",
                       os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def start_orchestrator(self) -> None:
        if self.orchestrator is None:
            out = self._output("orchestrator")
            self.orchestrator = subprocess.Popen(
                [sys.executable, str(CHILD), "orchestrate", str(self.store), str(self.log)],
                cwd=REPO, env=self.env, stdout=out, stderr=out)
            os.close(out)

    def start_worker(self) -> None:
        if self.worker is None:
            out = self._output("worker")
            self.worker = subprocess.Popen(
                [str(WALSYNC), "sync", "--store", str(self.store), "--status-every", "0"],
                cwd=REPO, env=self.env, stdout=out, stderr=out)
            os.close(out)

    def wait_up(self) -> None:
        """Both started ones at work: the orchestrator opened the store (a line in its
        log), the worker holds SYNC.lock."""
        if self.worker is not None:
            pid = self.worker.pid
            wait_for(lambda: self._alive("worker") and sync_holder_pid(self.store) == pid,
                     30, what="the worker to start")
        if self.orchestrator is not None:
            line = f"opened {self.orchestrator.pid}"
            wait_for(lambda: self._alive("orchestrator") and self.log.exists()
                     and line in self.log.read_text(), 30,
                     what="the orchestrator to open the store")

    def _alive(self, which: str) -> bool:
        proc = getattr(self, which)
        if proc is not None and proc.poll() is not None:
            outputs = sorted(self.tmp.glob(f"{which}.*.out"))
            raise AssertionError(f"the {which} exited ({proc.returncode}): "
                                 f"{outputs[-1].read_text()[-3000:] if outputs else ''}")
        return True

    def kill(self, which: str) -> None:
        proc = getattr(self, which)
        if proc is not None:
            if proc.poll() is not None:
                self._alive(which)  # it died on its own: say why
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            setattr(self, which, None)

    def stop_worker(self) -> None:
        """SIGTERM: the worker stops after the call in flight and releases SYNC.lock."""
        proc = self.worker
        if proc is not None:
            # its handlers are in place once it said it is syncing
            out = sorted(self.tmp.glob("worker.*.out"), key=lambda p: int(p.suffixes[0][1:]))
            wait_for(lambda: "syncing" in out[-1].read_text(), 30, what="the worker to start")
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            self.worker = None


def parse_log(log: Path) -> tuple[dict[int, tuple[int, str]], list[str]]:
    """The acknowledged writes (step -> (LSN, how)) and every line, in order."""
    lines = log.read_text().splitlines() if log.exists() else []
    acks = {}
    for line in lines:
        if line.startswith("ack "):
            _, i, lsn, how = line.split()
            acks[int(i)] = (int(lsn), how)
    return acks, lines


def server_rows(server: Server, node: str) -> dict[str, list[int]]:
    """The node's entries on the server: key -> every LSN it arrived with."""
    rows: dict[str, list[int]] = {}
    for (origin, lsn, key), _value in server.entries().items():
        if origin == node:
            rows.setdefault(key, []).append(lsn)
    return rows


def check_remote_acks(server: Server, node: str, log: Path) -> None:
    """Every 'remote' write the orchestrator was told about is on the server."""
    acks, _ = parse_log(log)
    rows = server_rows(server, node)
    for i, (lsn, how) in acks.items():
        if how == "remote":
            assert rows.get(f"w/{i:05d}") == [lsn], f"remote write w/{i:05d} (LSN {lsn}) " \
                "acknowledged but not on the server"


def third_node_writes(store: Store, rep: Replicator, round_: int) -> list[str]:
    keys = [f"c/{round_:02d}/{j}" for j in range(3)]
    for key in keys:
        store.put(key, {"round": round_, "key": key})
    rep.sync_once(60)
    return keys


#: the orchestrator reopened: it replays and applies what its WAL holds, then idles
REOPEN = """
import sys, time
from walsync.engine import Store
store = Store.open(sys.argv[1], create=False)
store.applied_lsn  # replayed and applied
print("applied", flush=True)
time.sleep(120)
"""


def run_schedule(servers: Callable[[str], Server], tmp_path: Path, kind: str, seed: int,
                 rounds: int) -> None:
    rng = random.Random(seed)
    server = servers(kind)
    path = tmp_path / "orchestrator"
    with Store.open(path, node_id="orch") as store:
        store.put("before", 1)
    log = tmp_path / "log"
    procs = Processes(path, log, server, tmp_path)
    third = Store.open(tmp_path / "third", node_id="third")
    rep = Replicator(third, server.transport(), ReplicatorOptions())
    written: list[str] = []
    progress: list[tuple[int, int]] = []  # (server's ack of the node, steps done) per round
    try:
        for round_ in range(rounds):
            procs.start_orchestrator()
            procs.start_worker()
            procs.wait_up()
            written += third_node_writes(third, rep, round_)
            time.sleep(rng.uniform(0.3, 1.5))
            victims = rng.choice([("orchestrator",), ("worker",), ("orchestrator", "worker"),
                                  ("worker", "orchestrator")])
            for i, victim in enumerate(victims):
                if i:
                    time.sleep(rng.uniform(0.0, 0.2))
                procs.kill(victim)
            check_remote_acks(server, "orch", log)
            steps = sum(1 for line in parse_log(log)[1] if line.startswith("done "))
            progress.append((server.acked("orch"), steps))
        # both run until everything acknowledged is on the server and everything the
        # third node wrote is in the orchestrator's store
        procs.start_orchestrator()
        procs.start_worker()
        procs.wait_up()

        state: dict[str, object] = {}

        def caught_up() -> bool:
            acks, lines = parse_log(log)
            rows = server_rows(server, "orch")
            seen = [int(line.split()[1]) for line in lines if line.startswith("seen ")]
            state.update(missing=[i for i in acks if f"w/{i:05d}" not in rows][:10],
                         seen=seen[-1:], written=len(written), inbox=inbox_pages(path)[:5])
            return (all(f"w/{i:05d}" in rows for i in acks)
                    and bool(seen) and seen[-1] == len(written))

        try:
            wait_for(caught_up, 60, interval=0.1, what="the worker and the orchestrator "
                     "to catch up")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {state}") from None
        procs.kill("orchestrator")
        # What it acknowledged after that check and had not yet applied when killed is
        # shipped once a writer has replayed it (the worker ships what a writer applied):
        # the orchestrator's next open, here one that writes nothing and is SIGKILLed too.
        reopened = subprocess.Popen(
            [sys.executable, "-c", REOPEN, str(path)], stdout=subprocess.PIPE, text=True)

        def all_acked_on_server() -> bool:
            acks, _ = parse_log(log)
            rows = server_rows(server, "orch")
            return all(f"w/{i:05d}" in rows for i in acks)

        try:
            assert reopened.stdout is not None
            assert reopened.stdout.readline().strip() == "applied"
            wait_for(all_acked_on_server, 60, interval=0.1,
                     what="the worker to ship the writes the orchestrator acknowledged last")
        finally:
            reopened.kill()
            reopened.wait()
            if reopened.stdout is not None:
                reopened.stdout.close()
        procs.stop_worker()
    finally:
        procs.kill("orchestrator")
        procs.kill("worker")
        rep.close()
        third.close()

    acks, lines = parse_log(log)
    assert acks, "the orchestrator acknowledged nothing"
    # both made progress, round after round
    assert progress[-1][0] > progress[0][0] or progress[0][0] > 0
    assert progress[-1][1] > progress[0][1]
    with Store.open(path, create=False) as store:
        # what the third node wrote: merged here, each by one merge record
        for key in written:
            assert store.get(key) == {"round": int(key.split("/")[1]), "key": key}
        merged: dict[str, int] = {}
        dots: dict[tuple[str, int], int] = {}
        # (checkpoints remove segments the server acknowledged: what the WAL still holds)
        reader = store.wal_reader()
        oldest = reader.oldest_lsn() or 1
        for rec in reader.read(oldest - 1, store.applied_lsn, 1 << 30):
            if rec.kind == KIND_MERGE:
                for key, entry in rec.ops:
                    if key.startswith("c/"):
                        merged[key] = merged.get(key, 0) + 1
                        for sib in decode_entry(entry):
                            dots[(sib.version.origin, sib.version.lsn)] = \
                                dots.get((sib.version.origin, sib.version.lsn), 0) + 1
        if oldest == 1:
            assert merged == dict.fromkeys(written, 1), "a pulled write merged twice, or never"
        assert set(merged.values()) <= {1}, "a pulled write merged twice"
        assert set(dots.values()) <= {1}
        assert inbox_pages(path) == []
        # every acknowledged write: here, and on the server exactly once
        rows = server_rows(server, "orch")
        for i, (lsn, _how) in acks.items():
            key = f"w/{i:05d}"
            assert store.get(key) == i
            assert rows[key] == [lsn], f"{key}: on the server as {rows.get(key)}, acked {lsn}"
        assert all(len(lsns) == 1 for key, lsns in rows.items() if key.startswith("w/"))
        assert not [k for k in rows if k.startswith("c/")], "pulled writes were pushed back"
        assert server.acked("orch") <= store.applied_lsn
    # no step whose success was recorded ran again
    done: set[int] = set()
    for line in lines:
        what, _, arg = line.partition(" ")
        if what == "done":
            done.add(int(arg))
        elif what == "start":
            assert int(arg) not in done, f"step {arg} ran again after it succeeded"


@pytest.mark.parametrize("seed", [11, 23])
def test_worker_and_orchestrator_killed_at_random_postgres(
        servers: Callable[[str], Server], tmp_path: Path, seed: int) -> None:
    run_schedule(servers, tmp_path, "postgres", seed, rounds=6)


def test_worker_and_orchestrator_killed_at_random_supabase(
        servers: Callable[[str], Server], tmp_path: Path) -> None:
    run_schedule(servers, tmp_path, "supabase", 5, rounds=3)
