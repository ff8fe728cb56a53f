"""The memory server against PostgreSQL: random sequences of every call, the same to both,
and every answer compared.

Hypothesis draws schedules of pushes (new records, batches sent again, entries repeated
inside a batch, concurrent version vectors, fencing tokens on run keys), claimed pushes
(under the claim's token or another, after a gap), claims, leases taken, renewed and
released, pulls from any position with any page size, and reads (node status, head,
conflicts, state pages and counts, node entries, leases). Each call goes to a real
database (postgres transport) and to a MemoryServer; their documents must be equal but
for each server's own clock readings and id (compared by form, see
test_transport_contract.OWN_FIELDS), and a call that fails must fail with the same class
on both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.sync._helpers import entry
from tests.sync.test_transport_contract import _plain, own_fields_out
from walsync.engine.errors import SyncError
from walsync.sync.memory import MemoryServer
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.remote import RpcTransport
from walsync.sync.transport import Claim, WireBatch

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(600)]

NODES = ("A", "B", "C")
#: plain keys; a run's keys in the reserved namespace and in the older spelling, each
#: in both of its places; another run's; keys that only look like a run's
KEYS = ("k1", "k2", "k/x", ".walsync/runs/r1", ".walsync/runs/r1/steps/s",
        ".walsync/index/runs/r1", "runs/r1", "runs/r1/steps/s", "index/runs/r1", "runs/r2",
        ".walsync/runs/r2/outputs/s/1", "runsx/r1", ".walsync/runsx/r1")
RUNS = ("r1", "r2")
TOKENS = ("t1", "t2", "t3")
PREFIXES = ("", "k", "runs/", "runs/r1", "index/", ".walsync/", ".walsync/runs/r1", "zz")


@pytest.fixture(scope="module")
def database(pg_cluster: Any) -> Iterator[str]:
    dsn = pg_cluster.create_database("walsync_differential")
    migrate(dsn)
    try:
        yield dsn
    finally:
        pg_cluster.drop_database("walsync_differential")


def _empty(dsn: str) -> None:
    """The database as freshly migrated (its server id kept)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("truncate walsync.entries, walsync.siblings, walsync.nodes, "
                     "walsync.fenced, walsync.leases")
        conn.execute("update walsync.head set pos = 0")
        conn.execute("select setval('walsync.positions', 0)")  # positions from 1 again


class Pair:
    """One call to both servers, answers compared."""

    def __init__(self, dsn: str, db: RpcTransport, server: MemoryServer) -> None:
        self.dsn = dsn
        self.db = db
        self.server = server
        self.memory = server.transport()
        self.calls = 0

    def put_lease_back(self, run_id: str, token: int) -> None:
        """Both servers' lease row of the run as a backup from before its record held
        it: an older token, expired (what test_fencing does to a restored database)."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            changed = conn.execute("update walsync.leases set token = %s, expires_at = now() "
                                   "where run_id = %s", (token, run_id)).rowcount
        assert changed == len([x for x in self.memory.leases() if x.run_id == run_id])
        if changed:
            self.server.set_lease(run_id, token=token, expire=True)

    def both(self, what: str, call: Callable[[RpcTransport], Any]) -> Any:
        self.calls += 1
        got = []
        for t in (self.db, self.memory):
            try:
                got.append(("answer", own_fields_out(_plain(call(t)))))
            except SyncError as exc:
                got.append(("error", type(exc).__name__))
        assert got[0] == got[1], (what, got)
        return got[0][1]

    def read_everything(self) -> None:
        self.both("head", lambda t: t.head())
        for node in (*NODES, "nobody"):
            self.both(f"node_status {node}", lambda t, n=node: t.node_status(n))
            self.both(f"node_entries {node}", lambda t, n=node: t.node_entries(n, 0, 1000))
            self.both(f"hello? {node}", lambda t, n=node: t.hello(
                n, tokens=list(TOKENS), new_token=None, acked_lsn=1000, base_lsn=0))
        for prefix in PREFIXES:
            self.both(f"conflicts {prefix}", lambda t, p=prefix: t.conflicts(p, 100))
            self.both(f"state_count {prefix}", lambda t, p=prefix: t.state_count(p))
            self.both(f"state_page {prefix}", lambda t, p=prefix: t.state_page(p, None, 1000))
        self.both("leases", lambda t: t.leases())
        # the raw documents too (the typed answers above are checked views of them)
        for fn, args in (("pull", {"p_node": "nobody", "p_after": 0, "p_limit": 1000}),
                         ("state_page", {"p_prefix": "", "p_after_key": None,
                                         "p_limit": 1000}),
                         ("leases", {"p_holder": None})):
            assert own_fields_out(self.db.call(fn, args)) == \
                own_fields_out(self.memory.call(fn, args)), fn


def _entries(data: st.DataObject, node: str, first_lsn: int) -> list[dict[str, Any]]:
    """One to three records of ``node`` from ``first_lsn``, each writing one to three keys;
    version vectors that saw other nodes' writes (or not), fencing tokens, tombstones,
    HLCs that tie."""
    out = []
    for lsn in range(first_lsn, first_lsn + data.draw(st.integers(1, 3), "records")):
        keys = data.draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True),
                         "keys")
        for idx, key in enumerate(keys):
            vv = {node: lsn, **data.draw(st.dictionaries(
                st.sampled_from([n for n in NODES if n != node]), st.integers(0, 4),
                max_size=2), "seen")}
            value = data.draw(st.sampled_from([None, 0, 1, 2, "x"]), "value")
            e = entry(node, lsn, key, value, vv, hlc=data.draw(st.sampled_from([7, 8, 9]),
                                                               "hlc") << 16, idx=idx)
            e["fence"] = data.draw(st.sampled_from([0, 0, 1, 2, 3]), "fence")
            out.append(e)
    if out and data.draw(st.booleans(), "repeat one"):
        out.append(dict(data.draw(st.sampled_from(out), "repeated")))
    return out


def _step(data: st.DataObject, pair: Pair, lsns: dict[str, int],
          sent: list[tuple[str, int, list[dict[str, Any]]]]) -> None:
    op = data.draw(st.sampled_from(["push", "push", "push", "resend", "claimed", "hello",
                                    "acquire", "renew", "release", "put back", "pull",
                                    "page"]), "op")
    node = data.draw(st.sampled_from(NODES), "node")
    if op == "push" or (op == "resend" and not sent):
        batch = _entries(data, node, lsns[node] + 1)
        lsns[node] = max(e["lsn"] for e in batch)
        through = lsns[node] + data.draw(st.integers(0, 1), "merges after")
        sent.append((node, through, batch))
        pair.both("push", lambda t: t.push(node, through, batch))
    elif op == "resend":
        node, through, batch = data.draw(st.sampled_from(sent), "sent")
        pair.both("resend", lambda t: t.push(node, through, batch))
    elif op == "claimed":
        token = data.draw(st.sampled_from([*TOKENS, None]), "incarnation")
        after = data.draw(st.sampled_from([0, lsns[node], lsns[node] + 2]), "after")
        base = data.draw(st.sampled_from([0, 0, 1]), "base")
        batch = [] if data.draw(st.booleans(), "empty") else _entries(data, node,
                                                                      lsns[node] + 1)
        lsns[node] = max([lsns[node], *(e["lsn"] for e in batch)])
        claim = Claim(token, base, after)
        pair.both("push_claimed", lambda t: t.push(node, lsns[node],
                                                   WireBatch(batch, claim)))
    elif op == "hello":
        tokens = data.draw(st.lists(st.sampled_from(TOKENS), max_size=3, unique=True), "tokens")
        new = data.draw(st.sampled_from([*TOKENS, None]), "new token")
        acked = data.draw(st.integers(0, lsns[node] + 1), "acked")
        base = data.draw(st.integers(0, 2), "base")
        pair.both("hello", lambda t: t.hello(node, tokens=tokens, new_token=new,
                                             acked_lsn=acked, base_lsn=base))
    elif op in ("acquire", "renew", "release", "put back"):
        run = data.draw(st.sampled_from(RUNS), "run")
        token = data.draw(st.integers(0, 4), "token")
        if op == "put back":
            pair.put_lease_back(run, token)
        elif op == "acquire":
            pair.both(op, lambda t: t.lease_acquire(run, node, 600))
        elif op == "renew":
            pair.both(op, lambda t: t.lease_renew(run, node, token, 600))
        else:
            pair.both(op, lambda t: t.lease_release(run, node, token))
    elif op == "pull":
        after = data.draw(st.integers(0, 30), "after")
        limit = data.draw(st.sampled_from([0, 1, 2, 3, 5, 1000]), "limit")
        pair.both("pull", lambda t: t.pull(node, after, limit))
    else:
        prefix = data.draw(st.sampled_from(PREFIXES), "prefix")
        after_key = data.draw(st.sampled_from([None, "k1", "runs/r1"]), "after key")
        limit = data.draw(st.integers(0, 3), "limit")
        pair.both("state_page", lambda t: t.state_page(prefix, after_key, limit))
        pair.both("node_entries", lambda t: t.node_entries(node, limit, limit + 3))


@settings(max_examples=40, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_transport_differential_memory_answers_as_postgresql(database: str,
                                                             data: st.DataObject) -> None:
    _empty(database)
    db = PostgresTransport(database, timeout_seconds=20)
    pair = Pair(database, db, MemoryServer())
    try:
        lsns = dict.fromkeys(NODES, 0)
        sent: list[tuple[str, int, list[dict[str, Any]]]] = []
        for _ in range(data.draw(st.integers(1, 30), "steps")):
            _step(data, pair, lsns, sent)
        pair.read_everything()
    finally:
        db.close()
