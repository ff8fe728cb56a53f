"""A reusable network-fault round for sync (README: guarantees; network faults lose nothing and
duplicate nothing), run by the sweep (test_faults_network_sweep.py) and by the soak.

One round: two stores (the round's nodes A and B) commit a small seeded workload (puts,
deletes, multi-key batches, keys both nodes write so that siblings appear, a few commits
with durability 'remote') while their replicators ship and pull through a ``FaultProxy``
(tests/sync/_proxy.py) in front of the server: PostgreSQL itself for the postgres
transport, a PostgREST-compatible gateway (tests/gateway.py) for the supabase transport.
Meanwhile a seeded schedule injects faults of one kind (``FAULT_KINDS``). Then the faults
are lifted, the replicators drain and pull to the server's head, and the checker holds
the server and both stores against the ledger of acknowledged commits:

* the ledger equals what each store's WAL holds (the ledger itself is right);
* every acknowledged commit's entries ``(origin, lsn, key)`` are on the server exactly
  once, with the committed bytes, codec, version vector, clock and fence, and nothing else
  of the round's nodes is (no loss, no duplicate, no invention); the server's head moved
  by exactly the number of entries it inserted (a re-sent batch draws no position);
* the server's siblings per key equal the maximal versions of every entry, and so do both
  stores' after pulling (convergence);
* an acknowledged LSN never runs ahead of the server: checked after every fault while the
  faults fly, at the end on the value persisted in each store, and for each 'remote'
  commit at the moment it returns.

Rounds share a database: node ids and keys carry a per-round prefix, and each store
starts pulling at the server's head of the round's start. ``run_round(rng, workdir, dsn,
cluster)`` picks the transport and the fault kind from ``rng`` when not told them; it
never raises for a violation, it lists them in the ``RoundResult``.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from tests.crash.ledger import Commit as SharedCommit
from tests.crash.ledger import KeyState, Observed
from tests.crash.ledger import Ledger as SharedLedger
from tests.crash.rounds import RoundResult as CrashRoundResult
from tests.gateway import PostgrestGateway
from tests.pg import PostgresCluster
from tests.sync._helpers import local_entries, with_port
from tests.sync._proxy import FaultProxy
from walsync.engine import Store
from walsync.engine.errors import RemoteDurabilityTimeoutError
from walsync.engine.record import decode_value
from walsync.sync.merge import Replica, sibling_from_wire
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.supabase import SupabaseTransport
from walsync.sync.transport import Transport

__all__ = ["FAULT_KINDS", "TRANSPORTS", "Commit", "Fault", "Ledger", "RoundResult",
           "plan_faults", "run_round"]

TRANSPORTS = ("postgres", "supabase")
FAULT_KINDS = ("reset", "truncate_response", "truncate_request", "delay", "refuse", "spike",
               "half_open", "restart", "mixed")
#: the kinds a "mixed" round draws from (cheap ones: no restart, no timeout to sit out)
_MIXABLE = ("reset", "truncate_response", "truncate_request", "delay", "refuse")

#: the server's statement timeout (postgres) and the HTTP timeout (supabase) of a round
CALL_TIMEOUT_SECONDS = 0.5
#: postgres: a call with no answer at all after this is on a dead connection
ANSWER_TIMEOUT_SECONDS = 1.0
#: a latency spike: each chunk held longer than either client waits
SPIKE_SECONDS = 1.2
#: faults fall within this many seconds of the round's start (the workload's length)
HORIZON_SECONDS = 0.3
#: after the faults are lifted the replicators must drain within this
DRAIN_SECONDS = 30.0

OPTIONS = ReplicatorOptions(pull_interval_seconds=0.03, batch_records=50,
                            batch_wait_seconds=0.002, retry_initial_seconds=0.01,
                            retry_max_seconds=0.15)

_PRIVATE_KEYS = 6
_SHARED_KEYS = 3


# -- the ledger --------------------------------------------------------------------------


@dataclass(frozen=True)
class Commit:
    """One acknowledged local commit: its node, LSN and ops (key -> value, None: delete)."""

    node: str
    lsn: int
    ops: dict[str, Any]
    remote: bool = False


class Ledger:
    """Every commit the stores acknowledged, appended by the writer, read by the checker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._commits: list[Commit] = []

    def add(self, commit: Commit) -> None:
        with self._lock:
            self._commits.append(commit)

    def commits(self) -> list[Commit]:
        with self._lock:
            return list(self._commits)

    def entries(self, node: str | None = None, upto: int | None = None
                ) -> dict[tuple[str, int, str], Any]:
        """``(origin, lsn, key) -> value`` of the commits (of ``node``, up to LSN ``upto``)."""
        return {(c.node, c.lsn, key): value for c in self.commits()
                if (node is None or c.node == node) and (upto is None or c.lsn <= upto)
                for key, value in c.ops.items()}


# -- the fault schedule ------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One fault: what, when (seconds after the round's start), for how long, how hard."""

    kind: str
    at: float
    hold: float = 0.0
    nbytes: int = 0
    to_client: bool = True
    delay: float = 0.0

    def describe(self) -> str:
        if self.kind == "truncate":
            way = "response" if self.to_client else "request"
            return f"truncate {way} to {self.nbytes} B @{self.at:.2f}s"
        extra = f" {self.delay * 1000:.0f} ms" if self.delay else ""
        span = f" for {self.hold:.2f}s" if self.hold else ""
        return f"{self.kind}{extra} @{self.at:.2f}s{span}"


def plan_faults(rng: random.Random, kind: str) -> list[Fault]:
    """The seeded schedule of a round whose fault kind is ``kind``, in time order."""

    def at() -> float:
        return rng.uniform(0.0, HORIZON_SECONDS)

    plan: list[Fault] = []
    if kind == "reset":
        plan = [Fault("reset", at()) for _ in range(rng.randint(2, 4))]
    elif kind in ("truncate_response", "truncate_request"):
        to_client = kind == "truncate_response"
        # inside the first message, a few messages in, or deep in a page of entries
        plan = [Fault("truncate", at(), nbytes=rng.randint(0, rng.choice((64, 400, 4000))),
                      to_client=to_client) for _ in range(rng.randint(2, 3))]
    elif kind == "delay":
        plan = [Fault("delay", at(), hold=rng.uniform(0.1, 0.3), delay=rng.uniform(0.003, 0.03))
                for _ in range(rng.randint(1, 2))]
    elif kind == "refuse":
        plan = [Fault("refuse", at(), hold=rng.uniform(0.05, 0.25))
                for _ in range(rng.randint(1, 2))]
    elif kind == "spike":
        plan = [Fault("spike", at(), hold=rng.uniform(0.15, 0.35), delay=SPIKE_SECONDS)]
    elif kind == "half_open":
        plan = [Fault("half_open", at(), hold=rng.uniform(0.05, 0.2))]
    elif kind == "restart":
        plan = [Fault("restart", at(), hold=rng.uniform(0.0, 0.2))]
        if rng.random() < 0.5:
            plan.append(Fault("reset", at()))
    elif kind == "mixed":
        for _ in range(rng.randint(3, 5)):
            plan += plan_faults(rng, rng.choice(_MIXABLE))[:1]
    else:
        raise ValueError(f"unknown fault kind {kind!r} (one of {', '.join(FAULT_KINDS)})")
    return sorted(plan, key=lambda f: f.at)


# -- the result --------------------------------------------------------------------------


@dataclass
class RoundResult:
    transport: str
    fault: str
    prefix: str
    faults_injected: int = 0
    commits_acknowledged: int = 0
    remote_acknowledged: int = 0
    entries: int = 0
    retries: int = 0
    seconds: float = 0.0
    fault_log: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        return (f"{self.transport}/{self.fault} {self.prefix}: {self.commits_acknowledged} "
                f"commits ({self.remote_acknowledged} remote), {self.entries} entries, "
                f"{self.faults_injected} faults, {self.retries} retries, {self.seconds:.2f} s, "
                f"{len(self.violations)} violations; faults: {'; '.join(self.fault_log)}")


# -- the round ---------------------------------------------------------------------------


class _Round:
    """The state of one round; ``run`` drives it, the checks fill ``result.violations``."""

    def __init__(self, rng: random.Random, workdir: Path, dsn: str, cluster: PostgresCluster,
                 transport: str, fault: str, commits: int) -> None:
        self.rng = rng
        self.workdir = workdir
        self.dsn = dsn
        self.cluster = cluster
        self.n_commits = commits
        self.prefix = f"nf{rng.getrandbits(40):010x}"
        self.nodes = (f"{self.prefix}-A", f"{self.prefix}-B")
        self.result = RoundResult(transport, fault, self.prefix)
        self.ledger = Ledger()
        self.stores: dict[str, Store] = {}
        self.reps: dict[str, Replicator] = {}
        self.proxy: FaultProxy | None = None
        self.gateway: PostgrestGateway | None = None
        self.violations = self.result.violations

    # -- plumbing ------------------------------------------------------------------------
    @property
    def direct(self) -> str:
        """The checker's own DSN: straight to the database, past every fault."""
        return with_port(self.dsn, self.cluster.port)

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.direct, autocommit=True, connect_timeout=5) as conn:
            return conn.execute(sql, params).fetchall()

    def head(self) -> int:
        return int(self.query("select pos from walsync.head")[0][0])

    def transport(self) -> Transport:
        assert self.proxy is not None
        if self.result.transport == "postgres":
            return PostgresTransport(with_port(self.dsn, self.proxy.port),
                                     timeout_seconds=CALL_TIMEOUT_SECONDS,
                                     connect_timeout_seconds=2,
                                     idle_in_transaction_seconds=0.3,
                                     answer_timeout_seconds=ANSWER_TIMEOUT_SECONDS)
        assert self.gateway is not None
        url = f"http://127.0.0.1:{self.proxy.port}"
        return SupabaseTransport(url, self.gateway.service_role_key,
                                 timeout_seconds=CALL_TIMEOUT_SECONDS)

    # -- the workload (the caller's thread) -----------------------------------------------
    def _value(self, i: int, node: str) -> dict[str, Any]:
        value: dict[str, Any] = {"i": i, "node": node, "r": self.rng.getrandbits(30)}
        if self.rng.random() < 0.05:  # compressed on disk and on the wire
            value["pad"] = "walsync " * 700
        return value

    def _ops(self, i: int, node: str) -> dict[str, Any]:
        rng = self.rng
        own = [f"{self.prefix}/{node[-1]}/k{j}" for j in range(_PRIVATE_KEYS)]
        shared = [f"{self.prefix}/shared/s{j}" for j in range(_SHARED_KEYS)]
        roll = rng.random()
        if roll < 0.40:
            return {rng.choice(own): self._value(i, node)}
        if roll < 0.52:
            return {rng.choice(own): None}
        if roll < 0.72:  # one record, several keys
            keys = rng.sample(own + shared, rng.randint(2, 4))
            return {k: None if rng.random() < 0.2 else self._value(i, node) for k in keys}
        return {rng.choice(shared): None if rng.random() < 0.15 else self._value(i, node)}

    def _commit(self, store: Store, ops: dict[str, Any], remote: bool) -> int:
        durability = "remote" if remote else None
        if len(ops) == 1:
            ((key, value),) = ops.items()
            if value is None:
                return store.delete(key, durability=durability).lsn
            return store.put(key, value, durability=durability).lsn
        with store.batch(durability) as batch:
            for key, value in ops.items():
                if value is None:
                    batch.delete(key)
                else:
                    batch.put(key, value)
        assert batch.result is not None
        return batch.result.lsn

    def workload(self) -> None:
        rng = self.rng
        for i in range(self.n_commits):
            node = rng.choice(self.nodes)
            ops = self._ops(i, node)
            remote = rng.random() < 0.06
            try:
                lsn = self._commit(self.stores[node], ops, remote)
            except RemoteDurabilityTimeoutError as exc:  # durable here, not yet there
                self.ledger.add(Commit(node, exc.lsn, ops))
            else:
                self.ledger.add(Commit(node, lsn, ops, remote))
                if remote:
                    self.result.remote_acknowledged += 1
                    self.check_remote_commit(node, lsn, ops)
            time.sleep(rng.uniform(0.0, 0.008))

    # -- faults (the chaos thread) -------------------------------------------------------
    def inject(self, fault: Fault) -> bool:
        """Apply one fault (and lift it after its hold); whether it took effect."""
        proxy = self.proxy
        assert proxy is not None
        if fault.kind == "reset":
            proxy.reset_all()
        elif fault.kind == "truncate":
            proxy.truncate_next(fault.nbytes, to_client=fault.to_client)
            deadline = time.monotonic() + 0.3  # it fires on the next chunk that way
            while proxy.truncation_pending and time.monotonic() < deadline:
                time.sleep(0.005)
            if proxy.truncation_pending:
                return False
        elif fault.kind in ("delay", "spike"):
            proxy.delay_seconds = fault.delay
            time.sleep(fault.hold)
            proxy.delay_seconds = 0.0
        elif fault.kind == "refuse":
            proxy.refuse = True
            time.sleep(fault.hold)
            proxy.refuse = False
        elif fault.kind == "half_open":
            proxy.blackhole = True
            time.sleep(fault.hold)
            proxy.blackhole = False
        elif fault.kind == "restart":
            self.cluster.kill()  # a crash: connections cut, crash recovery on start
            time.sleep(fault.hold)
            self.cluster.start()
            self.follow_server_port()
        else:
            raise ValueError(f"unknown fault {fault.kind!r}")
        return True

    def follow_server_port(self) -> None:
        """After a restart the server may listen elsewhere (its port was taken)."""
        if self.result.transport == "postgres":
            assert self.proxy is not None
            self.proxy.upstream = ("127.0.0.1", self.cluster.port)
        elif self.gateway is not None:
            self.gateway.dsn = make_conninfo(self.gateway.dsn, port=str(self.cluster.port))

    def chaos(self, plan: list[Fault], started: float) -> None:
        for fault in plan:
            time.sleep(max(0.0, started + fault.at - time.monotonic()))
            if self.inject(fault):
                self.result.faults_injected += 1
                self.result.fault_log.append(fault.describe())
            else:
                self.result.fault_log.append(fault.describe() + " (no traffic: not fired)")
            self.check_acked(f"after {fault.describe()}")

    # -- checks --------------------------------------------------------------------------
    def server_has(self, node: str, upto: int) -> set[tuple[str, int, str]] | None:
        """The round's entries of ``node`` up to LSN ``upto`` on the server (None: down)."""
        try:
            rows = self.query("select origin, lsn, key from walsync.entries "
                              "where origin = %s and lsn <= %s", (node, upto))
        except psycopg.Error:
            return None  # mid-restart: nothing to compare with
        return {(str(o), int(n), str(k)) for o, n, k in rows}

    def check_acked(self, when: str) -> None:
        """What a replicator holds as acknowledged is on the server, every entry of it."""
        for node, rep in self.reps.items():
            acked = rep.acked_lsn
            expected = self.ledger.entries(node, upto=acked)
            found = self.server_has(node, acked)
            if found is None:
                continue
            missing = sorted(set(expected) - found)
            if missing:
                self.violations.append(f"{when}: {node} holds LSN {acked} as acknowledged but "
                                       f"the server lacks {len(missing)} of its entries, e.g. "
                                       f"{missing[:3]}")

    def check_remote_commit(self, node: str, lsn: int, ops: dict[str, Any]) -> None:
        found = self.server_has(node, lsn)
        if found is None:
            return
        missing = sorted({(node, lsn, k) for k in ops} - found)
        if missing:
            self.violations.append(f"a 'remote' commit ({node} LSN {lsn}) returned before the "
                                   f"server had {missing}")

    def drain(self) -> None:
        """Wait (faults lifted) until both replicators shipped everything, pulled to the
        server's head and acknowledged their merge records; a replicator that stopped or
        did not get there in DRAIN_SECONDS is a violation."""
        deadline = time.monotonic() + DRAIN_SECONDS

        def settled(what: str, done: Callable[[Replicator], bool]) -> bool:
            while True:
                stopped = {n: r.error for n, r in self.reps.items() if r.error is not None}
                if stopped:
                    for node, err in stopped.items():
                        self.violations.append(f"replicator {node} stopped: {err!r}")
                    return False
                if all(done(r) for r in self.reps.values()):
                    return True
                if time.monotonic() > deadline:
                    state = {n: r.status() for n, r in self.reps.items()}
                    self.violations.append(
                        f"not drained within {DRAIN_SECONDS:g} s after the faults were lifted "
                        f"({what}): " + "; ".join(
                            f"{n}: acked {s.acked_lsn}/{s.applied_lsn}, cursor {s.pull_cursor}, "
                            f"last error {s.last_error}" for n, s in state.items()))
                    return False
                time.sleep(0.01)

        if not settled("shipping", lambda r: r.status().lag_entries == 0):
            return
        head = self.head()
        if not settled("pulling", lambda r: r.status().pull_cursor >= head):
            return
        settled("acknowledging merges", lambda r: r.status().lag_entries == 0)

    def check_end(self, head_before: int) -> None:
        violations = self.violations
        expected = self.ledger.entries()
        self.result.commits_acknowledged = len(self.ledger.commits())
        self.result.entries = len(expected)
        # the ledger is what the WALs hold
        wire: dict[tuple[str, int, str], dict[str, Any]] = {}
        for store in self.stores.values():
            for e in local_entries(store):
                wire[(e["origin"], e["lsn"], e["key"])] = e
        if set(wire) != set(expected):
            violations.append(f"ledger and WALs differ: only in the ledger "
                              f"{sorted(set(expected) - set(wire))[:3]}, only in a WAL "
                              f"{sorted(set(wire) - set(expected))[:3]}")
        for dot, value in expected.items():
            logged = wire.get(dot)
            if logged is None:
                continue
            stored = None if logged["deleted"] else decode_value(logged["codec"], logged["data"])
            if stored != value:
                violations.append(f"{dot}: the WAL holds {stored!r}, the commit wrote {value!r}")
        # the server holds each entry once, as it was written, and nothing else of the round
        rows = self.query("select origin, lsn, key, deleted, data, codec, vv, hlc, fence, pos "
                          "from walsync.entries where origin = any(%s)", (list(self.nodes),))
        # (the table's key is (origin, lsn, key): a second row of one entry cannot exist)
        on_server = {(str(o), int(n), str(k)): tuple(rest) for o, n, k, *rest in rows}
        lost = sorted(set(expected) - set(on_server))
        extra = sorted(set(on_server) - set(expected))
        if lost:
            violations.append(f"lost: {len(lost)} acknowledged entries are not on the server, "
                              f"e.g. {lost[:3]}")
        if extra:
            violations.append(f"the server holds {len(extra)} entries nobody committed, "
                              f"e.g. {extra[:3]}")
        for dot, (deleted, data, codec, vv, hlc, fence, _pos) in on_server.items():
            sent = wire.get(dot)
            if sent is None:
                continue
            row = (bool(deleted), None if data is None else bytes(data), int(codec), dict(vv),
                   int(hlc), int(fence))
            want = (bool(sent["deleted"]), sent["data"], int(sent["codec"]), dict(sent["vv"]),
                    int(sent["hlc"]), int(sent["fence"]))
            if row != want:
                violations.append(f"{dot} differs on the server: {row!r} != {want!r}")
        # and by the crash suites' checker (tests/crash/ledger.py), one writer per node:
        # every acknowledged commit there with its value, nothing no commit wrote
        for node in self.nodes:
            violations.extend(f"{node} on the server: {problem}"
                              for problem in self.check_with_shared_ledger(node, on_server))
        # each entry of the round its own position, after the head before it and at or
        # below the head now (positions come from a sequence: a push cut off after drawing
        # leaves its block unused, a re-sent batch draws none)
        head_after = self.head()
        positions = [int(rest[-1]) for rest in on_server.values()]
        if len(set(positions)) != len(positions):
            violations.append(f"{len(positions) - len(set(positions))} positions held twice")
        outside = [p for p in positions if not head_before < p <= head_after]
        if outside:
            violations.append(f"positions outside ({head_before}, {head_after}]: {outside[:3]}")
        # acknowledged LSNs, as persisted, never ahead of the server
        for node, store in self.stores.items():
            persisted = store.sync_ledger.acked_lsn
            mine = self.ledger.entries(node)
            last = max((lsn for _o, lsn, _k in mine), default=0)
            if persisted < last:
                violations.append(f"{node}: persisted acked LSN {persisted} < last commit {last}")
            behind = sorted(d for d in mine if d[1] <= persisted and d not in on_server)
            if behind:
                violations.append(f"{node}: persisted acked LSN {persisted} covers entries the "
                                  f"server lacks: {behind[:3]}")
        # convergence: server and stores hold the maximal versions of every entry
        replica = Replica()
        for e in wire.values():
            replica.apply(e["key"], sibling_from_wire(e))
        want_sibs = replica.canonical()
        got_server: dict[str, list[tuple[str, int]]] = {}
        for key, origin, lsn in self.query("select key, origin, lsn from walsync.siblings "
                                           "where key like %s", (self.prefix + "/%",)):
            got_server.setdefault(str(key), []).append((str(origin), int(lsn)))
        got_server = {k: sorted(v) for k, v in sorted(got_server.items())}
        if got_server != want_sibs:
            violations.append(f"server siblings {_diff(got_server, want_sibs)}")
        for node, store in self.stores.items():
            held = {k: sorted((s.version.origin, s.version.lsn) for s in sibs)
                    for k, sibs in store.iter_siblings(self.prefix + "/")}
            if held != want_sibs:
                violations.append(f"{node}'s siblings after pulling {_diff(held, want_sibs)}")

    def check_with_shared_ledger(self, node: str,
                                 on_server: dict[tuple[str, int, str], tuple[Any, ...]]
                                 ) -> list[str]:
        """The server's newest entry of each key from ``node`` against the node's commits."""
        commits = sorted((c for c in self.ledger.commits() if c.node == node),
                         key=lambda c: c.lsn)
        newest: dict[str, tuple[int, tuple[Any, ...]]] = {}
        for (origin, lsn, key), row in on_server.items():
            if origin == node and lsn > newest.get(key, (0, ()))[0]:
                newest[key] = (lsn, row)

        def read(key: str) -> KeyState | None:
            if key not in newest:
                return None
            lsn, (deleted, data, codec, *_rest) = newest[key]
            value = None if deleted else decode_value(int(codec), bytes(data))
            return KeyState(lsn, value, bool(deleted))

        return SharedLedger().check(
            [SharedCommit(node, seq, dict(c.ops), c.lsn) for seq, c in enumerate(commits)],
            Observed(read, set(newest)))

    # -- driving -------------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Stores, gateway, proxy and replicators up; everything down after, whatever
        happened (a failed round must not leave threads or a stopped server behind)."""
        try:
            for node in self.nodes:
                self.stores[node] = Store.open(self.workdir / node, node_id=node,
                                               remote_timeout_seconds=2.0)
            if self.result.transport == "supabase":
                self.gateway = PostgrestGateway(self.direct, schemas=["walsync_api"]).start()
                server = self.gateway._server
                assert server is not None
                # resets mid-request are this round's point: no traceback on stderr for each
                server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
                self.proxy = FaultProxy(self.gateway.port).start()
            else:
                self.proxy = FaultProxy(self.cluster.port).start()
            yield
        finally:
            for rep in self.reps.values():
                with contextlib.suppress(Exception):
                    rep.close()
            if self.proxy is not None:
                self.proxy.stop()
            if not self.cluster.running:
                self.cluster.start()
                self.follow_server_port()
            if self.gateway is not None:
                self.gateway.stop()
            for store in self.stores.values():
                store.close()

    def claim_prefix(self) -> None:
        """A prefix no earlier round in this database used (a seed may be run twice)."""
        base, n = self.prefix, 1
        while self.query("select exists(select 1 from walsync.nodes where node_id like %s) "
                         "or exists(select 1 from walsync.siblings where key like %s)",
                         (self.prefix + "-%", self.prefix + "/%"))[0][0]:
            n += 1
            self.prefix = f"{base}x{n}"
        self.nodes = (f"{self.prefix}-A", f"{self.prefix}-B")
        self.result.prefix = self.prefix

    def run(self, plan: list[Fault]) -> RoundResult:
        started = time.monotonic()
        self.claim_prefix()
        with self.running():
            head_before = self.head()
            for node, store in self.stores.items():
                # start pulling at the head: earlier rounds' entries are not this round's
                store.apply_remote([], pull_cursor=head_before)
                self.reps[node] = Replicator(store, self.transport(), OPTIONS).start()
            chaos = threading.Thread(target=self.chaos, args=(plan, time.monotonic()),
                                     name="netfaults-chaos", daemon=True)
            chaos.start()
            try:
                self.workload()
            finally:
                chaos.join()
                assert self.proxy is not None
                self.proxy.heal()
                if not self.cluster.running:
                    self.cluster.start()
                    self.follow_server_port()
            self.drain()
            self.check_acked("after draining")
            self.result.retries = sum(r.status().retries for r in self.reps.values())
            for rep in self.reps.values():
                rep.stop()
            self.check_end(head_before)
        self.result.seconds = time.monotonic() - started
        return self.result


def _diff(got: dict[str, list[tuple[str, int]]], want: dict[str, list[tuple[str, int]]]) -> str:
    keys = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    return "differ from the merge of every entry at " + "; ".join(
        f"{k}: {got.get(k)} != {want.get(k)}" for k in keys[:3]) + (
        f" (+{len(keys) - 3} keys)" if len(keys) > 3 else "")


def run_round(rng: random.Random, workdir: Path, dsn: str, cluster: PostgresCluster, *,
              transport: str | None = None, fault: str | None = None,
              commits: int | None = None) -> RoundResult:
    """One network-fault round (see the module docstring); violations in the result.

    ``dsn`` names a database of ``cluster`` (migrated here if it is not yet); rounds may
    share it, one at a time. ``workdir`` must exist; the round's stores go under it.
    ``transport`` / ``fault`` / ``commits`` are drawn from ``rng`` when None.
    """
    transport = transport or rng.choice(TRANSPORTS)
    fault = fault or rng.choice(FAULT_KINDS)
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r} (one of {', '.join(TRANSPORTS)})")
    commits = commits if commits is not None else rng.randint(20, 40)
    migrate(with_port(dsn, cluster.port))
    round_ = _Round(rng, workdir, dsn, cluster, transport, fault, commits)
    return round_.run(plan_faults(rng, fault))


def soak_round(cluster: PostgresCluster, dsn: str, rng: random.Random,
               workdir: Path) -> CrashRoundResult:
    """One round for ``python -m tests.soak`` (its Round shape): a random transport and
    fault kind; the faults injected count as its faults, nothing is killed."""
    result = run_round(rng, workdir, dsn, cluster)
    violations = [f"{result.summary()}\n{v}" for v in result.violations]
    return CrashRoundResult("network", kills=0, acknowledged=result.commits_acknowledged,
                            faults=result.faults_injected, violations=violations)
