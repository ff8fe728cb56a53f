"""Network faults between the replicator's transports and the server (README: guarantees; dropped
connections, delays, torn messages, half-open connections and a server restart lose
nothing and duplicate nothing), and answers that are not the server's (something in its
place answers garbage: a clear SyncProtocolError, never a KeyError or a hang). The faults
come from tests/sync/_proxy.py, a loopback TCP proxy; the seeded sweep over every fault
kind and both transports is test_faults_network_sweep.py.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from tests.gateway import service_role_key
from tests.pg import PostgresCluster
from tests.sync._helpers import entry, query, server_entry_ids, wait_for, with_port
from tests.sync._proxy import FaultProxy
from walsync.engine import Store
from walsync.engine.errors import RemoteUnavailableError, SyncError, SyncProtocolError
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.remote import (
    conflicts_of,
    hello_of,
    lease_grant,
    lease_list,
    lease_released,
    lease_renewal,
    node_entries_of,
    pull_page,
    push_ack,
    state_count_of,
    state_page,
)
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.supabase import SupabaseTransport

pytestmark = pytest.mark.postgres

OPTIONS = ReplicatorOptions(pull_interval_seconds=0.05, batch_records=200,
                            batch_wait_seconds=0.002, retry_initial_seconds=0.02,
                            retry_max_seconds=0.25)


@pytest.fixture
def proxy(pg_cluster: PostgresCluster, pg_db: str) -> Iterator[FaultProxy]:
    migrate(pg_db)
    p = FaultProxy(pg_cluster.port).start()
    try:
        yield p
    finally:
        p.stop()


def _transport(pg_db: str, proxy: FaultProxy) -> PostgresTransport:
    return PostgresTransport(with_port(pg_db, proxy.port), timeout_seconds=5,
                             connect_timeout_seconds=2)


T = TypeVar("T")


def _call_until_ok(call: Callable[[], T]) -> T:
    """A caller's retry: the first call after a fault may find its connection dead."""
    for _ in range(5):
        try:
            return call()
        except RemoteUnavailableError:
            continue
    raise AssertionError(f"{call} kept failing")


def test_proxy_faults_surface_as_unavailable_and_the_transport_recovers(
        pg_db: str, proxy: FaultProxy) -> None:
    t = _transport(pg_db, proxy)
    try:
        assert t.head() == 0
        assert proxy.open_connections == 1

        proxy.reset_all()  # a dropped connection
        with pytest.raises(RemoteUnavailableError):
            t.head()
        assert t.head() == 0  # reconnects

        proxy.truncate_next(7)  # a response torn mid-message
        with pytest.raises(RemoteUnavailableError):
            t.push("A", 1, [entry("A", 1, "k", 1)])
        # the torn push may or may not have committed; re-sending is harmless either way
        ack = _call_until_ok(lambda: t.push("A", 1, [entry("A", 1, "k", 1)]))
        assert ack.acked_lsn == 1

        proxy.truncate_next(3, to_client=False)  # a request torn mid-message
        with pytest.raises(RemoteUnavailableError):
            t.push("A", 2, [entry("A", 2, "k", 2, {"A": 2})])
        _call_until_ok(lambda: t.push("A", 2, [entry("A", 2, "k", 2, {"A": 2})]))

        proxy.refuse = True  # the server looks down
        with pytest.raises(RemoteUnavailableError, match=r"cannot reach|connection"):
            t.head()
        with pytest.raises(RemoteUnavailableError):
            t.head()
        proxy.refuse = False

        proxy.delay_seconds = 0.05  # slow, but fine
        started = time.monotonic()
        assert _call_until_ok(t.head) == 2
        assert time.monotonic() - started >= 0.05
        proxy.delay_seconds = 0.0
    finally:
        t.close()
    assert sorted(server_entry_ids(pg_db)) == [("A", 1, "k"), ("A", 2, "k")]
    assert query(pg_db, "select pos from walsync.head") == [(2,)]


def test_faults_network_replication_survives_resets_delays_and_a_restart(
        tmp_path: Path, pg_db: str, pg_cluster: PostgresCluster, proxy: FaultProxy) -> None:
    rnd = random.Random(20261123)
    total = 2000
    a = Store.open(tmp_path / "A", node_id="A", segment_bytes=64 * 1024)
    b = Store.open(tmp_path / "B", node_id="B")
    ra = Replicator(a, _transport(pg_db, proxy), OPTIONS).start()
    rb = Replicator(b, _transport(pg_db, proxy), OPTIONS).start()
    committed: set[tuple[str, int, str]] = set()
    stop = threading.Event()
    restarted = threading.Event()
    chaos_log: list[str] = []

    def chaos() -> None:
        while not stop.is_set():
            stop.wait(rnd.uniform(0.02, 0.08))
            roll = rnd.random()
            if roll < 0.5:
                proxy.reset_all()
                chaos_log.append("reset")
            elif roll < 0.65:
                proxy.delay_seconds = rnd.uniform(0.002, 0.02)
                stop.wait(0.1)
                proxy.delay_seconds = 0.0
                chaos_log.append("delay")
            elif roll < 0.8:
                proxy.truncate_next(rnd.randint(0, 300), to_client=rnd.random() < 0.7)
                chaos_log.append("truncate")
            else:
                proxy.refuse = True
                stop.wait(rnd.uniform(0.05, 0.2))
                proxy.refuse = False
                chaos_log.append("refuse")
            if len(committed) > total * 0.4 and not restarted.is_set():
                pg_cluster.restart()
                restarted.set()
                chaos_log.append("restart")

    troublemaker = threading.Thread(target=chaos, daemon=True)
    troublemaker.start()
    try:
        i = 0
        while i < total:
            if i % 10 == 0:  # a record of three keys now and then
                with a.batch() as batch:
                    for j in range(3):
                        batch.put(f"multi/{i}/{j}", {"i": i, "j": j})
                lsn = a.applied_lsn
                committed |= {("A", lsn, f"multi/{i}/{j}") for j in range(3)}
            else:
                key = f"k{rnd.randrange(500)}"  # overwrites too
                committed.add(("A", a.put(key, {"i": i}).lsn, key))
            i += 1
            time.sleep(0.001)  # ~3 s of traffic: time for dozens of faults
        wait_for(restarted.is_set, timeout=30, what="the database restart")
    finally:
        stop.set()
        troublemaker.join(timeout=60)
        proxy.refuse = False
        proxy.delay_seconds = 0.0
    try:
        assert {"reset", "restart"} <= set(chaos_log), chaos_log
        wait_for(lambda: ra.error is None and ra.status().lag_entries == 0, timeout=60,
                 what=f"A's lag back to 0 ({ra.status()})")
        assert ra.status().retries > 0
        summary = {k: chaos_log.count(k) for k in set(chaos_log)}
        assert len(chaos_log) >= 10, summary  # dozens of faults while the commits flowed
        assert proxy.resets >= 10, (proxy.resets, summary)
        # exactly the committed entries: nothing lost, nothing twice
        rows = server_entry_ids(pg_db)
        assert len(rows) == len(set(rows)) == len(committed)
        assert set(rows) == committed
        # each entry its own position, all at or below the head (a push cut off after
        # drawing its positions leaves them unused: positions come from a sequence)
        assert query(pg_db, "select count(*), count(distinct e.pos), max(e.pos) <= max(h.pos)"
                            " from walsync.entries e, walsync.head h") == [
            (len(committed), len(committed), True)]
        assert query(pg_db, "select acked_lsn from walsync.nodes where node_id = 'A'") == [
            (a.applied_lsn,)]
        # and the puller behind the same faults converged on the same state
        head = query(pg_db, "select pos from walsync.head")[0][0]
        wait_for(lambda: rb.error is None and rb.status().pull_cursor == head,
                 timeout=60, what="B caught up")
        assert dict(b.scan()) == dict(a.scan())
        assert rb.error is None
        assert ra.error is None
    finally:
        for rep in (ra, rb):
            rep.close()
        a.close()
        b.close()


def test_faults_network_sync_errors_never_leak_the_password(
        pg_db: str, proxy: FaultProxy) -> None:
    secret = "pw-over-the-proxy-5b1e"
    t = PostgresTransport(with_port(pg_db, proxy.port) + f" password={secret}",
                          connect_timeout_seconds=2)
    try:
        assert t.head() == 0
        errors: list[SyncError] = []
        for fault in ("reset", "truncate", "refuse"):
            if fault == "reset":
                proxy.reset_all()
            elif fault == "truncate":
                proxy.truncate_next(5)
            else:
                proxy.refuse = True
            with pytest.raises(SyncError) as info:
                t.head()
            errors.append(info.value)
            proxy.refuse = False
            _call_until_ok(t.head)
        for err in errors:
            assert isinstance(err, RemoteUnavailableError)
            assert secret not in str(err)
            assert secret not in repr(err)
    finally:
        t.close()


def _in_thread(fn: Callable[[], Any], timeout: float) -> BaseException | None:
    """Run ``fn`` in a thread; its exception, or fail if it is still running at ``timeout``
    (a call that hangs must fail the test, not stall the suite)."""
    box: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box.append(exc)
        else:
            box.append(None)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert box, f"the call still waits after {timeout} s"
    return box[0]


def test_faults_network_half_open_connection_is_cut_after_the_answer_timeout(
        pg_db: str, proxy: FaultProxy) -> None:
    """psycopg has no read timeout: without the transport's own deadline a call on a
    connection whose peer went silent waits until TCP gives up (a quarter of an hour)."""
    t = PostgresTransport(with_port(pg_db, proxy.port), timeout_seconds=0.3,
                          connect_timeout_seconds=2, answer_timeout_seconds=0.6)
    try:
        assert t.head() == 0
        proxy.blackhole = True  # the open connection goes silent, nothing is reset
        started = time.monotonic()
        error = _in_thread(t.head, timeout=10)
        assert isinstance(error, RemoteUnavailableError), error
        assert "no answer within 0.6 s" in str(error)
        assert 0.6 <= time.monotonic() - started < 5
        assert proxy.swallowed_bytes > 0  # the request did go into the void
        proxy.blackhole = False
        assert _call_until_ok(t.head) == 0
        t.push("A", 1, [entry("A", 1, "k", 1)])
    finally:
        t.close()
    assert server_entry_ids(pg_db) == [("A", 1, "k")]


def test_faults_network_replicator_gets_through_a_half_open_connection(
        tmp_path: Path, pg_db: str, proxy: FaultProxy) -> None:
    t = PostgresTransport(with_port(pg_db, proxy.port), timeout_seconds=0.3,
                          connect_timeout_seconds=2, answer_timeout_seconds=0.6)
    with Store.open(tmp_path / "A", node_id="A") as store:
        rep = Replicator(store, t, OPTIONS).start()
        try:
            store.put("k", 1)
            wait_for(lambda: rep.status().lag_entries == 0, what="the first ack")
            proxy.blackhole = True
            store.put("k", 2)
            time.sleep(0.2)
            proxy.blackhole = False  # the connection in use stays dead: only a timeout helps
            last = store.put("k", 3).lsn
            wait_for(lambda: rep.acked_lsn >= last, timeout=10, what="the ack after the cut")
            assert rep.error is None
            assert rep.status().retries >= 1
        finally:
            rep.close()
    assert sorted(lsn for _o, lsn, _k in server_entry_ids(pg_db)) == [1, 2, 3]


# -- something in the server's place answers garbage ----------------------------------


class _Canned(BaseHTTPRequestHandler):
    """Answers ``POST .../rpc/<fn>`` with the server's canned ``answers[fn]`` (or
    ``answers["*"]``): a (status, body)."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        answers = self.server.answers  # type: ignore[attr-defined]
        status, body = answers.get(self.path.rsplit("/", 1)[-1], answers["*"])
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


@pytest.fixture
def impostor() -> Iterator[ThreadingHTTPServer]:
    """An HTTP server in PostgREST's place that answers what ``.answers`` holds."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    server.daemon_threads = True
    server.answers = {"*": (200, b"{}")}  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize(("body", "reason"), [
    (b"<html>502 Bad Gateway</html>", "not a JSON object"),
    (b"\xff\xfe{", "UnicodeDecodeError"),  # a BOM makes json.loads try UTF-16
    (b"[" * 5000 + b"]" * 5000, "RecursionError"),
    (b'{"head": "7"}', "'head' is text"),
    (b'{"head": -1}', "not a bigint"),
])
def test_faults_network_garbage_answers_raise_a_protocol_error(
        impostor: ThreadingHTTPServer, body: bytes, reason: str) -> None:
    impostor.answers = {"*": (200, body)}  # type: ignore[attr-defined]
    t = SupabaseTransport(f"http://127.0.0.1:{impostor.server_address[1]}",
                          service_role_key(), timeout_seconds=5)
    try:
        with pytest.raises(SyncProtocolError, match=reason):
            t.head()
    finally:
        t.close()


def test_faults_network_replicator_stops_on_a_garbage_pull_and_keeps_the_entries(
        tmp_path: Path, impostor: ThreadingHTTPServer) -> None:
    """A pull page whose entry lacks its fields stopped the replicator with "unexpected
    KeyError"; now it is a protocol error, named in status, and nothing is merged."""
    status_doc = {"node_id": "A", "acked_lsn": 0, "acked_hlc": 0, "pull_cursor": 0}
    hello_doc = {"server_id": "impostor", "node_id": "A", "reason": None, "claimed": True,
                 "acked_lsn": 0, "acked_hlc": 0, "head": 1}
    page = {"entries": [{"key": "k", "origin": "B", "lsn": 1}], "next": 1, "head": 1}
    impostor.answers = {  # type: ignore[attr-defined]
        "*": (404, b"{}"), "node_status": (200, json.dumps(status_doc).encode()),
        "hello": (200, json.dumps(hello_doc).encode()),
        "pull": (200, json.dumps(page).encode())}
    t = SupabaseTransport(f"http://127.0.0.1:{impostor.server_address[1]}",
                          service_role_key(), timeout_seconds=5)
    with Store.open(tmp_path / "A", node_id="A") as store:
        rep = Replicator(store, t, ReplicatorOptions(pull_interval_seconds=0.01)).start()
        try:
            wait_for(lambda: rep.error is not None, what="the replicator to stop")
            assert isinstance(rep.error, SyncProtocolError)
            assert "entry B:1 of key 'k'" in str(rep.error)
            assert rep.status().stopped_reason == str(rep.error)
            assert store.get("k") is None
        finally:
            rep.close()


@pytest.mark.parametrize(("decode", "doc", "reason"), [
    (push_ack, {"acked_lsn": 1, "inserted": 1, "merged": 0, "head": 1,
                "fenced": [{"current": 2}]}, "'run_id'"),
    (push_ack, ["acked_lsn", 1], "not a JSON object"),
    (pull_page, {"entries": {}, "next": 1, "head": 1}, "'entries'"),
    (pull_page, {"entries": [entry("A", 1, "k", 1) | {"origin": "A", "data": "@@"}],
                 "next": 1, "head": 1}, "not base64"),
    (pull_page, {"entries": [entry("A", 1, "k", 1) | {"origin": "A", "vv": {"A": "1"}}],
                 "next": 1, "head": 1}, "version vector"),
    (pull_page, {"entries": [entry("A", 1, "k", 1) | {"origin": "A", "codec": 9}],
                 "next": 1, "head": 1}, "unknown codec"),
    (state_page, {"rows": [], "last_key": None}, "'done'"),
    (state_page, {"rows": [entry("A", 1, "k", 1) | {"origin": "A", "value_hash": 5}],
                  "last_key": "k", "done": True}, "'value_hash'"),
    (hello_of, {"server_id": "s", "node_id": "n", "reason": "gone", "claimed": False,
                "acked_lsn": 0, "acked_hlc": 0, "head": 0}, "'reason'"),
    (hello_of, {"server_id": "s", "node_id": "n", "reason": None, "claimed": 1,
                "acked_lsn": 0, "acked_hlc": 0, "head": 0}, "'claimed'"),
    (node_entries_of, {"rows": [{"lsn": "1", "key": "k", "md5": None, "hlc": 1}]}, "'lsn'"),
    (node_entries_of, {"rows": [{"lsn": 1, "key": "k", "md5": None, "hlc": -1}]}, "'hlc'"),
    (node_entries_of, {"entries": []}, "'rows'"),
    (conflicts_of, {"key": "k", "versions": 2}, "not a JSON array"),
    (conflicts_of, [{"key": "k", "versions": "2"}], "'versions'"),
    (state_count_of, {"keys": 1}, "'bytes'"),
    (lease_grant, {"acquired": True, "run_id": "r", "holder": "h", "token": 1,
                   "expires_at": None, "now": "t"}, "'expires_at'"),
    (lease_grant, {"acquired": "yes", "run_id": "r", "holder": "h", "token": 1,
                   "expires_at": "t", "now": "t"}, "'acquired'"),
    (lease_renewal, {"renewed": True, "token": None, "expires_at": "t"}, "'token'"),
    (lease_renewal, {"renewed": False, "holder": 7, "token": None, "expires_at": None},
     "'holder'"),
    (lease_released, {"released": None}, "'released'"),
    (lease_list, [{"run_id": "r", "holder": "h", "token": 1, "expires_at": "t"}], "'live'"),
    (lease_list, {"run_id": "r"}, "not a JSON array"),
])
def test_faults_network_malformed_documents_raise_a_protocol_error(
        decode: Callable[[Any], Any], doc: Any, reason: str) -> None:
    with pytest.raises(SyncProtocolError, match=reason):
        decode(doc)


def test_faults_network_postgres_answer_nested_past_the_limit_raises_a_protocol_error(
        pg_db: str) -> None:
    """psycopg decodes jsonb with json.loads, which raises RecursionError on nesting
    past the interpreter's limit: an answer like that is the server's fault, not a crash."""
    migrate(pg_db)
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute("create function walsync_api.deep_probe() returns jsonb language sql "
                     "as $$ select (repeat('[', 5000) || repeat(']', 5000))::jsonb $$")
    t = PostgresTransport(pg_db, connect_timeout_seconds=2)
    try:
        with pytest.raises(SyncProtocolError, match="nested too deeply"):
            t.call("deep_probe", {})
        assert t.head() == 0  # the connection is still good
    finally:
        t.close()
