"""One contract for every transport: ``postgres`` (psycopg, direct), ``supabase``
(supabase-py through the PostgREST-compatible gateway with a service_role JWT) and
``memory`` (the in-memory reference server of sync/memory.py).

Every test runs against each (the first two on a real database migrated by sync.migrate):
push, pull, node_status, head and the other typed calls answer the same; push is
idempotent; pull returns other origins' whole records past PostgREST's 1,000-row cap;
errors fall into the same classes; no credential ever appears in an error.

Where the memory server cannot answer as the SQL does, the test says so where it compares:
its clock is its own (``last_push_at``, ``last_pull_at``, ``expires_at``, ``now`` are
another clock's readings, compared by form), and it has no tenant mode (one tenant; the
tenant-mode functions are tested in test_tenant_mode.py). tests/sync/
test_transport_differential.py runs random call sequences against PostgreSQL and the
memory server and compares every answer.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import walsync.sync
from tests.gateway import PostgrestGateway, mint_jwt
from tests.pg import PostgresCluster, free_port
from tests.sync._helpers import (
    PASSWORD,
    assert_secret_absent,
    dbname,
    ensure_password_role,
    entry,
    password_dsn,
    query,
    records,
    supabase_transport,
    with_port,
)
from walsync.engine.errors import (
    RemoteAuthError,
    RemoteRejectedError,
    RemoteSchemaError,
    RemoteUnavailableError,
    SyncError,
)
from walsync.sync.memory import MemoryServer, MemoryTransport
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.supabase import SupabaseTransport
from walsync.sync.transport import (
    Claim,
    FencedRun,
    NodeStatus,
    Transport,
    TransportProxy,
    WireBatch,
)

KINDS = [pytest.param("postgres", marks=pytest.mark.postgres),
         pytest.param("supabase", marks=pytest.mark.postgres), "memory"]
#: the memory server's key (it refuses any other)
MEMORY_KEY = "memory-server-key-0c7e"
#: what the memory server reads off its own clock: another clock's readings than the
#: database's, compared by form only
CLOCK_FIELDS = ("last_push_at", "last_pull_at", "expires_at", "now")
#: a timestamptz as PostgreSQL writes it into jsonb (the form the memory server keeps)
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?\+00:00$")


@dataclass
class Server:
    """One server (a database, or a memory server) and a way to reach it with the
    transport under test."""

    kind: str
    dsn: str | None
    cluster: PostgresCluster | None
    gateway: PostgrestGateway | None
    memory: MemoryServer | None
    opened: list[Transport]

    def transport(self) -> Transport:
        t: Transport
        if self.kind == "postgres":
            assert self.dsn is not None
            t = PostgresTransport(self.dsn, timeout_seconds=10, connect_timeout_seconds=3)
        elif self.kind == "supabase":
            assert self.gateway is not None
            t = supabase_transport(self.gateway)
        else:
            assert self.memory is not None
            t = self.memory.transport()
        self.opened.append(t)
        return t

    def migrate(self) -> Transport:
        if self.memory is not None:
            self.memory.migrate()
        else:
            assert self.dsn is not None
            migrate(self.dsn)
        return self.transport()

    # what the server's tables and views hold

    def winners(self) -> list[tuple[str, str, int, bool]]:
        """``walsync.state``: (key, origin, lsn, deleted) of each key's winner."""
        if self.memory is not None:
            return sorted((k, w["origin"], w["lsn"], w["deleted"])
                          for k, w in self.memory.state().items())
        assert self.dsn is not None
        return sorted(query(self.dsn, "select key, origin, lsn, deleted from walsync.state"))

    def entry_counts(self) -> tuple[int, int, int]:
        """Entries, distinct (origin, lsn, key) among them, the highest position."""
        if self.memory is not None:
            rows = self.memory.entries()
            return (len(rows), len({(e["origin"], e["lsn"], e["key"]) for e in rows}),
                    max(e["pos"] for e in rows))
        assert self.dsn is not None
        (got,) = query(self.dsn, "select count(*), count(distinct (origin, lsn, key)), "
                                 "max(pos) from walsync.entries")
        return got  # type: ignore[return-value]

    def put_lease_back(self, run_id: str, token: int) -> None:
        """The run's lease row as a backup from before the run's record held it: an older
        token, expired."""
        if self.memory is not None:
            self.memory.set_lease(run_id, token=token, expire=True)
            return
        assert self.dsn is not None
        query(self.dsn, "update walsync.leases set token = %s, expires_at = now() "
                        "where run_id = %s returning 1", (token, run_id))


@pytest.fixture(params=KINDS)
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    kind = request.param
    if kind == "memory":
        srv = Server(kind, None, None, None, MemoryServer(migrated=False, key=MEMORY_KEY), [])
    else:
        cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
        dsn: str = request.getfixturevalue("pg_db")
        gateway = None
        if kind == "supabase":
            gateway = request.getfixturevalue("pg_gateway")(schemas=["walsync_api"])
        srv = Server(kind, dsn, cluster, gateway, None, [])
    try:
        yield srv
    finally:
        for t in srv.opened:
            t.close()


def expect_error(cls: type[SyncError], call: Callable[[], object]) -> SyncError:
    with pytest.raises(SyncError) as info:
        call()
    assert type(info.value) is cls, (type(info.value).__name__, str(info.value))
    return info.value


# -- the calls -------------------------------------------------------------------------


def test_transport_migrated_server_answers_every_call(server: Server) -> None:
    t = server.migrate()
    assert t.name == server.kind
    assert t.head() == 0
    unknown = t.node_status("nobody")
    assert unknown == NodeStatus("nobody", 0, 0, 0, {})

    batch = [entry("A", 1, "a", 1), entry("A", 2, "b", "two"), entry("A", 3, "a", None,
                                                                       {"A": 3})]
    ack = t.push("A", 3, batch)
    assert (ack.acked_lsn, ack.inserted, ack.merged, ack.head, ack.fenced) == (3, 3, 2, 3, [])
    assert (ack.server_id, ack.refused) == (None, None)  # a plain push: no claim
    assert t.head() == 3
    status = t.node_status("A")
    assert (status.node_id, status.acked_lsn, status.pull_cursor) == ("A", 3, 0)
    assert status.acked_hlc == max(e["hlc"] for e in batch)
    assert TIMESTAMP.match(status.extra["last_push_at"]), status.extra
    assert status.extra["last_pull_at"] is None

    # concurrent with A's "b", and later by its clock: the winner
    t.push("B", 1, [entry("B", 1, "b", "bee", hlc=1_800_000_000_000 << 16)])
    assert [(c.key, c.versions) for c in t.conflicts("", 10)] == [("b", 2)]
    assert t.conflicts("a", 10) == []
    count = t.state_count("")
    assert (count.keys, count.bytes) == (2, len(b"ctwo") + len(b"cbee"))  # b's values, CBOR
    # every key's winner, as the server's views hold it: "a" is A's tombstone
    assert server.winners() == [("a", "A", 3, True), ("b", "B", 1, False)]
    page = t.state_page("", None, 10)
    assert page.done
    assert page.last_key == "b"
    assert [(r.key, r.sibling.version.origin, r.sibling.version.lsn) for r in page.rows] == [
        ("a", "A", 3), ("b", "A", 2), ("b", "B", 1)]
    assert page.rows[2].sibling.data == b"cbee"
    assert page.rows[2].value_hash == entry("B", 1, "b", "bee")["value_hash"]


def test_transport_push_same_batch_twice_is_idempotent(server: Server) -> None:
    t = server.migrate()
    batch = records("A", 40, 3)
    first = t.push("A", 40, batch)
    assert (first.inserted, first.acked_lsn, first.head) == (120, 40, 120)
    again = t.push("A", 40, batch)
    assert (again.inserted, again.merged, again.acked_lsn, again.head) == (0, 0, 40, 120)
    # a batch resent with a lower acknowledgement never moves acked_lsn back
    older = t.push("A", 10, batch[:30])
    assert (older.inserted, older.acked_lsn) == (0, 40)
    # an entry repeated inside one batch counts once
    dup = entry("A", 41, "dup", 1)
    twice = t.push("A", 41, [dup, dup, dup])
    assert (twice.inserted, twice.merged, twice.acked_lsn) == (1, 1, 41)
    assert server.entry_counts() == (121, 121, 121)


def test_transport_pull_returns_other_origins_whole_records(server: Server) -> None:
    t = server.migrate()
    t.push("A", 5, records("A", 5, 2))
    t.push("B", 4, records("B", 4, 3))
    t.push("A", 7, records("A", 2, 2, first_lsn=6))
    head = t.head()
    assert head == 5 * 2 + 4 * 3 + 2 * 2

    page = t.pull("A", 0, 1000)
    assert page.head == head
    assert page.next == head
    assert {e["origin"] for e in page.entries} == {"B"}
    assert sorted((e["lsn"], e["key"]) for e in page.entries) == sorted(
        (e["lsn"], e["key"]) for e in records("B", 4, 3))
    positions = [e["pos"] for e in page.entries]
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)
    first = page.entries[0]
    assert set(first) >= {"pos", "origin", "lsn", "idx", "key", "deleted", "data", "codec",
                          "vv", "hlc", "fence", "value_hash"}
    assert t.node_status("A").pull_cursor == 0  # confirms the position it asked after

    # small pages: never a record cut in half, "next" moves past A's own rows too
    cursor, seen, pages = 0, [], 0
    while True:
        page = t.pull("B", cursor, 3)
        if page.next <= cursor:
            break
        pages += 1
        by_record: dict[int, int] = {}
        for e in page.entries:
            by_record[e["lsn"]] = by_record.get(e["lsn"], 0) + 1
        assert all(n == 2 for n in by_record.values()), by_record  # A's records: 2 keys
        assert all(e["origin"] == "A" for e in page.entries)
        seen += [(e["lsn"], e["key"]) for e in page.entries]
        cursor = page.next
    assert cursor == head
    assert pages >= 4
    assert sorted(seen) == sorted((e["lsn"], e["key"]) for e in records("A", 7, 2))
    assert t.node_status("B").pull_cursor == cursor
    assert t.pull("B", cursor, 3).entries == []


def test_transport_pull_pages_past_the_row_cap(server: Server) -> None:
    t = server.migrate()
    pushed = records("A", 700, 3)  # 2,100 entries, more than PostgREST's 1,000-row cap
    for i in range(0, len(pushed), 900):
        chunk = pushed[i:i + 900]
        t.push("A", chunk[-1]["lsn"], chunk)
    assert t.head() == 2100

    cursor, seen, sizes = 0, [], []
    while True:
        page = t.pull("C", cursor, 1000)
        if page.next <= cursor:
            break
        sizes.append(len(page.entries))
        lsns = [e["lsn"] for e in page.entries]
        assert all(lsns.count(n) == 3 for n in set(lsns))  # whole records only
        seen += [(e["origin"], e["lsn"], e["key"]) for e in page.entries]
        cursor = page.next
    assert len(sizes) == 3, sizes
    assert 1000 <= sizes[0] <= 1002, sizes  # completes the record at position 1,000
    assert max(sizes) <= 1002, sizes
    assert len(seen) == len(set(seen)) == 2100
    assert set(seen) == {("A", e["lsn"], e["key"]) for e in pushed}


#: fields each server fills in from its own state, not from the calls: its clock's
#: readings (CLOCK_FIELDS) and its identity, compared by form only
OWN_FIELDS = (*CLOCK_FIELDS, "server_id")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _form(name: str, value: Any) -> Any:
    if value is None:
        return None
    pattern = _UUID if name == "server_id" else TIMESTAMP
    assert type(value) is str, (name, value)
    assert pattern.match(value), (name, value)
    return f"<{name}>"


def own_fields_out(doc: Any) -> Any:
    """``doc`` with each server's own readings replaced by their form (``OWN_FIELDS``)."""
    if isinstance(doc, dict):
        return {k: _form(k, v) if k in OWN_FIELDS else own_fields_out(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [own_fields_out(v) for v in doc]
    return doc


@pytest.mark.postgres
def test_transport_every_transport_returns_identical_documents(
        pg_db: str, pg_gateway: Callable[..., PostgrestGateway]) -> None:
    """The same calls to a database (through postgres and supabase by turns) and to a
    memory server: the same typed answers and the same documents, but for each server's
    own clock and id (``OWN_FIELDS``)."""
    migrate(pg_db)
    direct = PostgresTransport(pg_db)
    rest = supabase_transport(pg_gateway(schemas=["walsync_api"]))
    memory = MemoryServer().transport()
    turns = [direct, rest]
    try:
        def both(i: int, call: Callable[[Any], Any]) -> Any:
            db, mem = call(turns[i % 2]), call(memory)
            assert own_fields_out(_plain(db)) == own_fields_out(_plain(mem)), i
            return db

        both(0, lambda t: t.push("A", 30, records("A", 30, 2)))
        both(1, lambda t: t.push("B", 20, records("B", 20, 2)))
        both(0, lambda t: t.push("B", 1, [entry("B", 1, "shared", "b")]))
        both(1, lambda t: t.push("A", 31, [entry("A", 31, "shared", "a")]))
        # claims and claimed pushes, taken and behind ones included
        both(0, lambda t: t.hello("C", tokens=["c1"], new_token="c1", acked_lsn=0, base_lsn=0))
        both(1, lambda t: t.hello("C", tokens=["x"], new_token="x2", acked_lsn=0, base_lsn=0))
        both(0, lambda t: t.push("C", 2, WireBatch([entry("C", 1, "runs/r1", 1),
                                                    entry("C", 2, "k/c", None)],
                                                   Claim("c1", 0, 0))))
        both(1, lambda t: t.push("C", 3, WireBatch([entry("C", 3, "k/c", 3)],
                                                   Claim("other", 0, 2))))
        both(0, lambda t: t.push("C", 9, WireBatch([entry("C", 9, "k/c", 9)],
                                                   Claim("c1", 0, 5))))
        both(1, lambda t: t.push("C", 4, WireBatch([], Claim("c1", 0, 2))))
        # leases, and fencing by holder and token
        both(0, lambda t: t.lease_acquire("r1", "D", 600))
        both(1, lambda t: t.lease_acquire("r1", "C", 600))
        both(0, lambda t: t.push("C", 5, WireBatch([entry("C", 5, "runs/r1/steps/a", 5)],
                                                   Claim("c1", 0, 4))))
        both(1, lambda t: t.push("D", 2, [{**entry("D", 1, "runs/r1", "d", {"C": 1, "D": 1}),
                                           "fence": 2}, entry("D", 2, "index/runs/r1", 0)]))
        both(0, lambda t: t.lease_renew("r1", "D", 2, 600))
        both(1, lambda t: t.lease_renew("r1", "C", 2, 600))
        both(0, lambda t: t.lease_release("r1", "D", 2))
        both(1, lambda t: t.lease_acquire("r1", "C", 600))
        both(0, lambda t: t.lease_acquire("r2", "D", 600))
        # the reads, typed and as documents
        reads: list[tuple[str, dict[str, Any], Callable[[Any], Any]]] = [
            ("pull", {"p_node": "A", "p_after": 0, "p_limit": 7}, lambda t: t.pull("A", 0, 7)),
            ("pull", {"p_node": "B", "p_after": 0, "p_limit": 1000},
             lambda t: t.pull("B", 0, 1000)),
            ("pull", {"p_node": "C", "p_after": 13, "p_limit": 25},
             lambda t: t.pull("C", 13, 25)),
            ("pull", {"p_node": "A", "p_after": 90, "p_limit": 5}, lambda t: t.pull("A", 90, 5)),
            ("node_status", {"p_node": "A"}, lambda t: t.node_status("A")),
            ("node_status", {"p_node": "C"}, lambda t: t.node_status("C")),
            ("node_status", {"p_node": "zz"}, lambda t: t.node_status("zz")),
            ("head", {}, lambda t: t.head()),
            ("conflicts", {"p_prefix": "", "p_limit": 5}, lambda t: t.conflicts("", 5)),
            ("state_count", {"p_prefix": "k/A"}, lambda t: t.state_count("k/A")),
            ("state_page", {"p_prefix": "k/B", "p_after_key": None, "p_limit": 4},
             lambda t: t.state_page("k/B", None, 4)),
            ("state_page", {"p_prefix": "", "p_after_key": "k/B/9/1", "p_limit": 1000},
             lambda t: t.state_page("", "k/B/9/1", 1000)),
            ("node_entries", {"p_node": "C", "p_after": 0, "p_upto": 9},
             lambda t: t.node_entries("C", 0, 9)),
            ("hello", {"p_node": "C", "p_tokens": ["c1"], "p_new_token": None,
                       "p_acked_lsn": 4, "p_base_lsn": 0},
             lambda t: t.hello("C", tokens=["c1"], new_token=None, acked_lsn=4, base_lsn=0)),
            ("leases", {"p_holder": None}, lambda t: t.leases()),
            ("leases", {"p_holder": "D"}, lambda t: t.leases("D")),
        ]
        for i, (fn, args, typed) in enumerate(reads):
            want = own_fields_out(direct.call(fn, args))
            assert own_fields_out(rest.call(fn, args)) == want, (fn, args)
            assert own_fields_out(memory.call(fn, args)) == want, (fn, args)
            both(i, typed)
        assert direct.head() == rest.head() == memory.head() == 104
    finally:
        direct.close()
        rest.close()
        memory.close()


def _plain(answer: Any) -> Any:
    """A typed answer as plain data, for comparing by form."""
    if isinstance(answer, list):
        return [_plain(a) for a in answer]
    if dataclasses.is_dataclass(answer) and not isinstance(answer, type):
        return {f.name: _plain(getattr(answer, f.name)) for f in dataclasses.fields(answer)}
    if isinstance(answer, dict):
        return {k: _plain(v) for k, v in answer.items()}
    if isinstance(answer, tuple):
        return [_plain(a) for a in answer]
    if isinstance(answer, bytes):  # an entry's bytes, as a JSON document carries them
        return base64.b64encode(answer).decode()
    return answer


# -- the typed calls, one by one -------------------------------------------------------


def test_transport_protocol_md_lists_every_call_of_the_door_and_every_transport() -> None:
    """sync/PROTOCOL.md "Transports": one row per method of ``Transport``, and one per
    transport, each of which has every method."""
    text = (Path(walsync.sync.__file__).with_name("PROTOCOL.md")).read_text()
    section = text.split("\n## Transports\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)\(", section, re.MULTILINE)
    methods = {name for name in dir(Transport) if not name.startswith("_")} - {"name"}
    assert sorted(rows) == sorted(methods)
    listed = re.findall(r"^\| `(\w+)` \| `sync/(\w+)\.py`", section, re.MULTILINE)
    kinds = {"postgres": PostgresTransport, "supabase": SupabaseTransport,
             "memory": MemoryTransport}
    assert sorted(listed) == sorted((k, k) for k in kinds)
    for cls in (*kinds.values(), TransportProxy):
        assert all(callable(getattr(cls, m, None)) for m in methods), cls




def test_transport_leases_are_taken_renewed_released_by_the_servers_clock(
        server: Server) -> None:
    t = server.migrate()
    got = t.lease_acquire("r1", "n1", 600)
    assert (got.acquired, got.run_id, got.holder, got.token) == (True, "r1", "n1", 1)
    assert TIMESTAMP.match(got.expires_at)
    assert got.now < got.expires_at
    held = t.lease_acquire("r1", "n2", 600)
    assert (held.acquired, held.holder, held.token) == (False, "n1", 1)
    again = t.lease_acquire("r1", "n1", 600)  # the holder again: its token is kept
    assert (again.acquired, again.token) == (True, 1)
    renewed = t.lease_renew("r1", "n1", 1, 600)
    assert (renewed.renewed, renewed.token, renewed.holder) == (True, 1, None)
    assert renewed.expires_at is not None
    assert renewed.expires_at >= got.expires_at
    lost = t.lease_renew("r1", "n2", 1, 600)
    assert (lost.renewed, lost.holder, lost.token) == (False, "n1", 1)
    nothing = t.lease_renew("nope", "n1", 1, 600)
    assert (nothing.renewed, nothing.holder, nothing.token, nothing.expires_at) == (
        False, None, None, None)
    assert [(x.run_id, x.holder, x.token, x.live) for x in t.leases()] == [
        ("r1", "n1", 1, True)]
    assert t.lease_release("r1", "n2", 1) is False
    assert t.lease_release("r1", "n1", 1) is True
    assert [(x.run_id, x.live) for x in t.leases("n1")] == [("r1", False)]
    assert t.leases("n2") == []
    taken = t.lease_acquire("r1", "n2", 600)  # released: a new holder, a larger token
    assert (taken.acquired, taken.holder, taken.token) == (True, "n2", 2)
    expect_error(RemoteRejectedError, lambda: t.lease_acquire("r3", "n1", 0))
    assert [x.run_id for x in t.leases()] == ["r1"]


def test_transport_fencing_refuses_by_holder_and_token_and_a_refusal_is_final(
        server: Server) -> None:
    t = server.migrate()
    assert t.lease_acquire("r", "n1", 600).token == 1
    ok = t.push("n1", 1, [{**entry("n1", 1, "runs/r", "n1's"), "fence": 1}])
    assert (ok.inserted, ok.fenced) == (1, [])
    other = t.push("n2", 1, [{**entry("n2", 1, "runs/r/steps/s", "n2's"), "fence": 2}])
    assert (other.inserted, other.fenced) == (0, [FencedRun("r", 1, "n1")])
    # n2 takes the run over with a token its refused entry happens to carry: that entry,
    # sent again, stays refused (never merged after the fact)
    t.lease_release("r", "n1", 1)
    assert t.lease_acquire("r", "n2", 600).token == 2
    again = t.push("n2", 1, [{**entry("n2", 1, "runs/r/steps/s", "n2's"), "fence": 2}])
    assert (again.inserted, again.merged, again.fenced) == (0, 0, [])
    assert [(e.key, e.hlc) for e in t.node_entries("n2", 0, 1)] == [("runs/r/steps/s", None)]
    fresh = t.push("n2", 2, [{**entry("n2", 2, "runs/r/steps/s", "n2's"), "fence": 2}])
    assert (fresh.inserted, fresh.fenced) == (1, [])


def test_transport_a_takeover_tops_the_tokens_the_runs_record_carries(server: Server) -> None:
    t = server.migrate()
    # no lease here yet: the run is no one's, its record merges with whatever token
    t.push("n1", 1, [{**entry("n1", 1, "runs/r", "v"), "fence": 7}])
    assert t.lease_acquire("r", "n2", 600).token == 8
    server.put_lease_back("r", 2)  # a lease row older than the record (a backup)
    assert t.lease_acquire("r", "n2", 600).token == 2  # its own again: kept
    server.put_lease_back("r", 2)
    taken = t.lease_acquire("r", "n3", 600)
    assert (taken.acquired, taken.token) == (True, 8)


def test_transport_claims_and_claimed_pushes(server: Server) -> None:
    t = server.migrate()
    first = t.hello("N", tokens=["t1"], new_token="t1", acked_lsn=0, base_lsn=0)
    assert (first.node_id, first.reason, first.claimed, first.acked_lsn, first.head) == (
        "N", None, True, 0, 0)
    assert t.hello("N", tokens=["t0"], new_token="t9", acked_lsn=0,
                   base_lsn=0).reason == "taken"
    ok = t.push("N", 2, WireBatch([entry("N", 1, "a", 1), entry("N", 2, "b", None)],
                                  Claim("t1", 0, 0)))
    assert (ok.acked_lsn, ok.inserted, ok.refused, ok.server_id) == (2, 2, None,
                                                                     first.server_id)
    gap = t.push("N", 6, WireBatch([entry("N", 6, "c", 6)], Claim("t1", 0, 5)))
    assert (gap.refused, gap.acked_lsn, gap.inserted) == ("behind", 2, 0)
    ahead = t.hello("N", tokens=["t2", "t1"], new_token="t2", acked_lsn=1, base_lsn=0)
    assert (ahead.reason, ahead.claimed, ahead.acked_lsn) == ("ahead", False, 2)
    assert [(e.lsn, e.key, e.md5 is None, e.hlc) for e in t.node_entries("N", 0, 9)] == [
        (1, "a", False, entry("N", 1, "a", 1)["hlc"]), (2, "b", True, entry("N", 2, "b", 0)["hlc"])]
    assert t.node_entries("N", 1, 1) == []


def test_transport_state_pages_cover_every_key_once_in_byte_order(server: Server) -> None:
    t = server.migrate()
    keys = ["a", "a/b", "a\u00e9", "a~", "b", "B", "a/\u4e2d", "runs/1", "a/b/c"]
    t.push("A", len(keys), [entry("A", n, k, n) for n, k in enumerate(keys, 1)])
    t.push("B", 1, [entry("B", 1, "a/b", "concurrent")])
    for prefix in ("", "a", "a/"):
        seen: list[str] = []
        after: str | None = None
        while True:
            page = t.state_page(prefix, after, 2)
            assert len({r.key for r in page.rows}) <= 2
            seen += [r.key for r in page.rows]
            if page.done:
                break
            assert page.last_key is not None
            after = page.last_key
        assert list(dict.fromkeys(seen)) == sorted(k for k in keys if k.startswith(prefix))
        assert seen.count("a/b") == (2 if "a/b".startswith(prefix) else 0)
        assert t.state_count(prefix).keys == len(set(seen))


# -- errors ----------------------------------------------------------------------------


def test_transport_missing_schema_raises_schema_error(server: Server) -> None:
    t = server.transport()  # never migrated
    for call in (t.head, lambda: t.push("A", 1, [entry("A", 1, "k", 1)]),
                 lambda: t.pull("A", 0, 10), lambda: t.node_status("A"),
                 lambda: t.conflicts("", 1), lambda: t.leases(),
                 lambda: t.hello("A", tokens=[], new_token=None, acked_lsn=0, base_lsn=0)):
        err = expect_error(RemoteSchemaError, call)
        assert err.hint
        assert "migrate" in err.hint
    server.migrate()
    assert t.head() == 0  # the same transport works once the schema exists


def test_transport_rejected_value_raises_rejected_error(server: Server) -> None:
    t = server.migrate()
    broken = entry("A", 1, "k", 1)
    broken["key"] = None  # the server refuses an entry without a key
    expect_error(RemoteRejectedError, lambda: t.push("A", 1, [broken]))
    assert t.head() == 0  # nothing of the batch was kept
    assert t.push("A", 1, [entry("A", 1, "k", 1)]).inserted == 1


def test_transport_bad_credentials_raise_auth_error(server: Server) -> None:
    server.migrate()
    bad: list[tuple[Transport, str]] = []
    if server.memory is not None:
        for key in ("wrong-key-5e1d", ""):
            bad.append((server.memory.transport(key), key or MEMORY_KEY))
    elif server.kind == "postgres":
        assert server.cluster is not None
        assert server.dsn is not None
        ensure_password_role(server.cluster)
        wrong = "wrong-password-9d2c41"
        bad.append((PostgresTransport(password_dsn(server.cluster, dbname(server.dsn), wrong),
                                      connect_timeout_seconds=3), wrong))
        # right password, but a role walsync_api is not granted to
        right = PostgresTransport(password_dsn(server.cluster, dbname(server.dsn), PASSWORD))
        bad.append((right, PASSWORD))
        nobody = "no-such-role-pw"
        bad.append((PostgresTransport(with_port(
            server.cluster.dsn(dbname(server.dsn), user="no_such_role"), server.cluster.port)
            + f" password={nobody}"), nobody))
    else:
        assert server.gateway is not None
        forged = mint_jwt({"role": "service_role"}, "another-secret-of-at-least-32-chars!!")
        anon = server.gateway.anon_key
        expired = server.gateway.mint({"role": "service_role"}, expires_in=-3600)
        for key in (forged, "not-a-jwt", anon, expired):
            bad.append((supabase_transport(server.gateway, key), key))
    try:
        for t, secret in bad:
            for call in (t.head, lambda t=t: t.push("A", 1, [entry("A", 1, "k", 1)])):
                err = expect_error(RemoteAuthError, call)
                assert_secret_absent(err, secret)
        assert server.migrate().head() == 0  # nothing was written by anyone
    finally:
        for t, _ in bad:
            t.close()


def _closed_port() -> int:
    port = free_port()
    with socket.socket() as s:  # nothing listens there
        assert s.connect_ex(("127.0.0.1", port)) != 0
    return port


def test_transport_server_down_raises_unavailable_error(
        server: Server, request: pytest.FixtureRequest) -> None:
    server.migrate()
    secret = "s3cret-pw-that-must-not-leak"
    down: list[Transport] = []
    if server.memory is not None:
        secret = MEMORY_KEY
        down.append(server.memory.transport())
        server.memory.stop()
    elif server.kind == "postgres":
        assert server.dsn is not None
        dsn = with_port(server.dsn, _closed_port()) + f" password={secret}"
        down.append(PostgresTransport(dsn, connect_timeout_seconds=2))
    else:
        assert server.gateway is not None
        assert server.dsn is not None
        pg_gateway = request.getfixturevalue("pg_gateway")
        # the gateway is up but its database is not (PostgREST answers 503 PGRST000) ...
        cut_off = PostgrestGateway(with_port(server.dsn, _closed_port()),
                                   schemas=["walsync_api"]).start()
        try:
            down.append(supabase_transport(cut_off, timeout_seconds=5))
            # ... and nothing listens at the project URL at all
            gone = pg_gateway(schemas=["walsync_api"])
            dead = supabase_transport(gone, timeout_seconds=5)
            gone.stop()
            down.append(dead)
            secret = server.gateway.service_role_key
            for t in down:
                for call in (t.head, lambda t=t: t.pull("A", 0, 1)):
                    err = expect_error(RemoteUnavailableError, call)
                    assert_secret_absent(err, secret)
        finally:
            cut_off.stop()
            for t in down:
                t.close()
        return
    try:
        for t in down:
            for call in (t.head, lambda t=t: t.push("A", 1, [entry("A", 1, "k", 1)]),
                         lambda t=t: t.lease_acquire("r", "A", 60)):
                err = expect_error(RemoteUnavailableError, call)
                assert_secret_absent(err, secret)
    finally:
        for t in down:
            t.close()
    if server.memory is not None:
        server.memory.start()
        assert down[0].head() == 0  # nothing was written while it was down


def test_transport_recovers_after_the_server_restarts(server: Server) -> None:
    t = server.migrate()
    assert t.push("A", 1, [entry("A", 1, "k", 1)]).inserted == 1
    if server.memory is not None:
        server.memory.stop()
        server.memory.start()
    else:
        assert server.cluster is not None
        server.cluster.restart()  # every open connection is cut
    answers: list[Any] = []
    for _ in range(3):  # the first call may see the dead connection: transient
        try:
            answers.append(t.push("A", 2, [entry("A", 2, "k", 2, {"A": 2})]))
            break
        except RemoteUnavailableError:
            continue
    assert answers
    assert answers[0].acked_lsn == 2
    assert t.head() == 2


class _FakeApiGateway(ThreadingHTTPServer):
    """What sits in front of PostgREST on a hosted project (an API gateway, a CDN): errors
    whose bodies are not PostgREST's, often JSON without a ``code``."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FakeHandler)
        self.daemon_threads = True
        self.reply: tuple[int, str, bytes] = (200, "application/json", b"{}")


class _FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, ctype, body = self.server.reply  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


def test_transport_supabase_classifies_errors_from_in_front_of_postgrest() -> None:
    server = _FakeApiGateway()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()
    key = mint_jwt({"role": "service_role"})
    t = SupabaseTransport(f"http://127.0.0.1:{server.server_address[1]}", key,
                          timeout_seconds=5)
    cases: list[tuple[int, str, bytes, type[SyncError]]] = [
        # Supabase's API gateway on a wrong key: JSON, but no "code"
        (401, "application/json", b'{"message": "Invalid API key", "hint": "Double check"}',
         RemoteAuthError),
        (403, "application/json", b'{"message": "forbidden"}', RemoteAuthError),
        # the gateway could not reach PostgREST
        (502, "application/json",
         b'{"message": "An invalid response was received from the upstream server"}',
         RemoteUnavailableError),
        (503, "text/html", b"<html>503 Service Unavailable</html>", RemoteUnavailableError),
        (504, "application/json", b'{"message": "timeout"}', RemoteUnavailableError),
        (429, "application/json", b'{"message": "Too many requests"}', RemoteUnavailableError),
        (520, "text/html", b"<html>origin error</html>", RemoteUnavailableError),
        (404, "application/json", b'{"message": "no Route matched with those values"}',
         RemoteSchemaError),
        (400, "application/json", b'{"message": "bad request"}', RemoteRejectedError),
    ]
    try:
        for status, ctype, body, cls in cases:
            server.reply = (status, ctype, body)
            for call in (t.head, lambda: t.push("A", 1, [entry("A", 1, "k", 1)])):
                err = expect_error(cls, call)
                assert_secret_absent(err, key)
        server.reply = (200, "application/json", b'{"head": 7, "schema_version": 1}')
        assert t.head() == 7
    finally:
        t.close()
        server.shutdown()
        server.server_close()
