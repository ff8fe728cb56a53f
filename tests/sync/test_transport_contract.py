"""One contract for both transports: ``postgres`` (psycopg, direct) and ``supabase``
(supabase-py through the PostgREST-compatible gateway with a service_role JWT).

Every test runs against both, on a real database migrated by sync.migrate: push, pull,
node_status, head and call answer the same; push is idempotent; pull returns other origins'
whole records past PostgREST's 1,000-row cap; errors fall into the same classes; no
credential ever appears in an error.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

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
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.remote import Transport
from walsync.sync.supabase import SupabaseTransport

pytestmark = pytest.mark.postgres

KINDS = ["postgres", "supabase"]


@dataclass
class Server:
    """One database and a way to reach it with the transport under test."""

    kind: str
    dsn: str
    cluster: PostgresCluster
    gateway: PostgrestGateway | None
    opened: list[Transport]

    def transport(self) -> Transport:
        t: Transport
        if self.kind == "postgres":
            t = PostgresTransport(self.dsn, timeout_seconds=10, connect_timeout_seconds=3)
        else:
            assert self.gateway is not None
            t = supabase_transport(self.gateway)
        self.opened.append(t)
        return t

    def migrate(self) -> Transport:
        migrate(self.dsn)
        return self.transport()


@pytest.fixture(params=KINDS)
def server(request: pytest.FixtureRequest, pg_cluster: PostgresCluster, pg_db: str,
           pg_gateway: Callable[..., PostgrestGateway]) -> Iterator[Server]:
    gateway = pg_gateway(schemas=["walsync_api"]) if request.param == "supabase" else None
    srv = Server(request.param, pg_db, pg_cluster, gateway, [])
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
    assert (unknown.node_id, unknown.acked_lsn, unknown.acked_hlc, unknown.pull_cursor) == (
        "nobody", 0, 0, 0)

    batch = [entry("A", 1, "a", 1), entry("A", 2, "b", "two"), entry("A", 3, "a", None,
                                                                       {"A": 3})]
    ack = t.push("A", 3, batch)
    assert (ack.acked_lsn, ack.inserted, ack.merged, ack.head, ack.fenced) == (3, 3, 2, 3, [])
    assert t.head() == 3
    status = t.node_status("A")
    assert (status.node_id, status.acked_lsn, status.pull_cursor) == ("A", 3, 0)
    assert status.acked_hlc == max(e["hlc"] for e in batch)
    assert status.extra["last_push_at"] is not None

    assert t.call("head", {}) == {"head": 3, "schema_version": 1}
    # concurrent with A's "b", and later by its clock: the winner
    t.push("B", 1, [entry("B", 1, "b", "bee", hlc=1_800_000_000_000 << 16)])
    assert t.call("conflicts", {"p_prefix": "", "p_limit": 10}) == [{"key": "b", "versions": 2}]
    assert t.call("conflicts", {"p_prefix": "a", "p_limit": 10}) == []
    assert t.call("state_count", {"p_prefix": ""})["keys"] == 2
    # every key's winner, as the server's views hold it: "a" is A's tombstone
    assert sorted(query(server.dsn, "select key, origin, lsn, deleted from walsync.state")) == [
        ("a", "A", 3, True), ("b", "B", 1, False)]


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
    assert query(server.dsn, "select count(*), count(distinct (origin, lsn, key)), max(pos) "
                             "from walsync.entries") == [(121, 121, 121)]


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


def test_transport_both_transports_return_identical_documents(
        pg_db: str, pg_gateway: Callable[..., PostgrestGateway]) -> None:
    migrate(pg_db)
    direct = PostgresTransport(pg_db)
    rest = supabase_transport(pg_gateway(schemas=["walsync_api"]))
    try:
        direct.push("A", 30, records("A", 30, 2))
        rest.push("B", 20, records("B", 20, 2))
        direct.push("B", 1, [entry("B", 1, "shared", "b")])
        rest.push("A", 31, [entry("A", 31, "shared", "a")])
        for node, after, limit in (("A", 0, 7), ("B", 0, 1000), ("C", 13, 25), ("A", 90, 5)):
            assert direct.pull(node, after, limit) == rest.pull(node, after, limit)
        assert direct.node_status("A") == rest.node_status("A")
        assert direct.node_status("zz") == rest.node_status("zz")
        assert direct.head() == rest.head() == 102
        for fn, args in (("conflicts", {"p_prefix": "", "p_limit": 5}),
                         ("state_count", {"p_prefix": "k/A"}),
                         ("state_page", {"p_prefix": "k/B", "p_after_key": None, "p_limit": 4})):
            assert direct.call(fn, args) == rest.call(fn, args)
    finally:
        direct.close()
        rest.close()


# -- errors ----------------------------------------------------------------------------


def test_transport_missing_schema_raises_schema_error(server: Server) -> None:
    t = server.transport()  # never migrated
    for call in (t.head, lambda: t.push("A", 1, [entry("A", 1, "k", 1)]),
                 lambda: t.pull("A", 0, 10), lambda: t.node_status("A"),
                 lambda: t.call("conflicts", {"p_prefix": "", "p_limit": 1})):
        err = expect_error(RemoteSchemaError, call)
        assert err.hint
        assert "migrate" in err.hint
    migrate(server.dsn)
    assert t.head() == 0  # the same transport works once the schema exists


def test_transport_rejected_value_raises_rejected_error(server: Server) -> None:
    t = server.migrate()
    broken = entry("A", 1, "k", 1)
    broken["key"] = None  # the server refuses an entry without a key
    expect_error(RemoteRejectedError, lambda: t.push("A", 1, [broken]))
    assert t.head() == 0  # nothing of the batch was kept
    assert t.push("A", 1, [entry("A", 1, "k", 1)]).inserted == 1


def test_transport_bad_credentials_raise_auth_error(server: Server) -> None:
    migrate(server.dsn)
    bad: list[tuple[Transport, str]] = []
    if server.kind == "postgres":
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
        server: Server, pg_gateway: Callable[..., PostgrestGateway]) -> None:
    migrate(server.dsn)
    secret = "s3cret-pw-that-must-not-leak"
    down: list[Transport] = []
    if server.kind == "postgres":
        dsn = with_port(server.dsn, _closed_port()) + f" password={secret}"
        down.append(PostgresTransport(dsn, connect_timeout_seconds=2))
    else:
        assert server.gateway is not None
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
            for call in (t.head, lambda t=t: t.push("A", 1, [entry("A", 1, "k", 1)])):
                err = expect_error(RemoteUnavailableError, call)
                assert_secret_absent(err, secret)
    finally:
        for t in down:
            t.close()


def test_transport_recovers_after_the_server_restarts(server: Server) -> None:
    t = server.migrate()
    assert t.push("A", 1, [entry("A", 1, "k", 1)]).inserted == 1
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
