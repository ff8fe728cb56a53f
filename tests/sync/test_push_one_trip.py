"""The postgres transport's push is one round trip (sync/PROTOCOL.md, "Scaling"): the
server commits before it answers, so the tenant's head row is never held while the
answer travels back and the client acts on it, and the guarantees of one transaction
stay: the statement timeout still bounds the call, an error in it leaves nothing
applied, nothing is left on the session for a pooler's next client, retries are
idempotent.

A small tap between the transport and the server counts round trips (the client
speaking again after the server did) and the server's ReadyForQuery messages (one per
Sync), and can hold back whatever the client sends once the
push's answer (its DataRow) went by — a client that has its answer and has not yet done
anything more.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.sync._helpers import entry, query, wait_for
from walsync.engine.errors import RemoteUnavailableError
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.transport import Claim, WireBatch

pytestmark = pytest.mark.postgres

WAIT_SECONDS = 20.0  # how long a push that must not wait may take under a loaded machine
APP = "walsync-one-trip-pusher"


class _Tap:
    """A loopback forwarder to the server that parses the server's message stream."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.ready = 0  # ReadyForQuery messages the server sent
        self.turns = 0  # times the client spoke after the server had
        self._server_spoke = True
        self.hold_armed = False
        self.row_seen = threading.Event()
        self.released = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def hold_after_next_row(self) -> None:
        """Once the server has sent a DataRow, pass nothing more from the client until
        ``release()``."""
        self.row_seen.clear()
        self.released.clear()
        self.hold_armed = True

    def release(self) -> None:
        self.hold_armed = False
        self.released.set()

    def close(self) -> None:
        self.release()
        self._stop.set()
        for s in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._upstream))
            self._sockets += [client, upstream]
            threading.Thread(target=self._client_to_server, args=(client, upstream),
                             daemon=True).start()
            threading.Thread(target=self._server_to_client, args=(upstream, client),
                             daemon=True).start()

    def _client_to_server(self, client: socket.socket, upstream: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := client.recv(65536):
                with self._lock:
                    self.turns += self._server_spoke
                    self._server_spoke = False
                if self.hold_armed and self.row_seen.is_set():
                    self.released.wait()
                upstream.sendall(chunk)
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)

    def _server_to_client(self, upstream: socket.socket, client: socket.socket) -> None:
        pending = b""
        with contextlib.suppress(OSError):
            while chunk := upstream.recv(65536):
                with self._lock:
                    self._server_spoke = True
                pending += chunk
                while len(pending) >= 5:  # every server message: type byte, int32 length
                    size = struct.unpack("!I", pending[1:5])[0]
                    if len(pending) < 1 + size:
                        break
                    kind, pending = pending[:1], pending[1 + size:]
                    if kind == b"Z":
                        with self._lock:
                            self.ready += 1
                    elif kind == b"D" and self.hold_armed:
                        self.row_seen.set()
                client.sendall(chunk)
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)


@pytest.fixture
def db(pg_db: str) -> str:
    migrate(pg_db)
    return pg_db


@pytest.fixture
def tap(db: str) -> Iterator[_Tap]:
    port = int(psycopg.conninfo.conninfo_to_dict(db)["port"])  # type: ignore[arg-type]
    t = _Tap(port)
    try:
        yield t
    finally:
        t.close()


def _through(dsn: str, tap: _Tap, **options: Any) -> PostgresTransport:
    # no SSL or GSS negotiation: its one-byte answers are not messages the tap could read
    return PostgresTransport(make_conninfo(dsn, host="127.0.0.1", port=str(tap.port),
                                           application_name=APP, sslmode="disable",
                                           gssencmode="disable"), **options)


def _batch(node: str, first: int, count: int, claim: Claim | None = None) -> WireBatch:
    return WireBatch([entry(node, lsn, f"k/{node}/{lsn}", {"n": lsn, "pad": "x" * 200})
                      for lsn in range(first, first + count)], claim)


def _entries_of(dsn: str, node: str) -> int:
    return int(query(dsn, "select count(*) from walsync.entries where origin = %s",
                     (node,))[0][0])


def test_a_push_is_one_round_trip_plain_and_claimed(db: str, tap: _Tap) -> None:
    t = _through(db, tap)
    try:
        t.head()  # connected
        for first, count in ((1, 2), (3, 400)):  # the second past libpq's 64 KiB buffer
            turns, ready = tap.turns, tap.ready
            ack = t.push("A", first + count - 1, _batch("A", first, count))
            assert (ack.acked_lsn, ack.inserted) == (first + count - 1, count)
            assert (tap.turns - turns, tap.ready - ready) == (1, 1)
        assert t.hello("B", tokens=["tb"], new_token="tb", acked_lsn=0, base_lsn=0).claimed
        turns, ready = tap.turns, tap.ready
        ack = t.push("B", 2, _batch("B", 1, 2, Claim("tb", 0, 0)))
        assert (ack.acked_lsn, ack.inserted) == (2, 2)
        assert (tap.turns - turns, tap.ready - ready) == (1, 1)
    finally:
        t.close()
    assert (_entries_of(db, "A"), _entries_of(db, "B")) == (402, 2)


def test_no_transaction_holds_the_head_row_once_the_answer_is_out(db: str,
                                                                  tap: _Tap) -> None:
    """The client has the push's answer and sends nothing more: its backend is idle with
    no lock, and another node's push goes through at once."""
    t = _through(db, tap, idle_in_transaction_seconds=120.0)
    other = PostgresTransport(db)
    done: dict[str, Any] = {}

    def first_push() -> None:
        try:
            done["ack"] = t.push("A", 3, _batch("A", 1, 3))
        except Exception as exc:  # noqa: BLE001 - the test reads it
            done["ack"] = exc

    try:
        t.head()
        tap.hold_after_next_row()
        pusher = threading.Thread(target=first_push, daemon=True)
        pusher.start()
        assert tap.row_seen.wait(WAIT_SECONDS), "the push never answered"
        held = query(db, "select a.state, (select count(*) from pg_locks l where l.pid = a.pid)"
                         " from pg_stat_activity a where a.application_name = %s", (APP,))
        assert held == [("idle", 0)]
        second = threading.Thread(target=lambda: done.update(
            other=other.push("B", 2, _batch("B", 1, 2))), daemon=True)
        t0 = time.monotonic()
        second.start()
        second.join(WAIT_SECONDS)
        assert not second.is_alive(), "another node's push waited on the held client"
        assert time.monotonic() - t0 < WAIT_SECONDS
        tap.release()
        pusher.join(WAIT_SECONDS)
        assert not pusher.is_alive()
    finally:
        tap.release()
        t.close()
        other.close()
    assert (done["ack"].acked_lsn, done["ack"].inserted) == (3, 3)
    assert (done["other"].acked_lsn, done["other"].inserted) == (2, 2)


def test_the_timeout_still_bounds_a_push_and_its_error_leaves_nothing(db: str,
                                                                      tap: _Tap) -> None:
    """A push stuck on the head row (held by another session) is ended by the server's
    statement timeout, with what it had inserted rolled back; the setting does not stay
    on the session; the retry applies the batch once."""
    t = _through(db, tap, timeout_seconds=1.0, answer_timeout_seconds=120.0)
    batch = _batch("A", 1, 5)
    try:
        with psycopg.connect(db) as holder:
            holder.execute("select * from walsync.head for update")
            t0 = time.monotonic()
            with pytest.raises(RemoteUnavailableError) as caught:
                t.push("A", 5, batch)
            assert "no answer within" not in str(caught.value)
            assert time.monotonic() - t0 < WAIT_SECONDS
            assert _entries_of(db, "A") == 0
            holder.rollback()
        state = query(db, "select state from pg_stat_activity where application_name = %s",
                      (APP,))
        assert state in ([], [("idle",)])
        session = t._connection()  # the session a pooler would hand its next client
        assert session.execute("show statement_timeout").fetchall() == [("0",)]
        first = t.push("A", 5, batch)
        again = t.push("A", 5, batch)
    finally:
        t.close()
    assert (first.acked_lsn, first.inserted) == (5, 5)
    assert (again.acked_lsn, again.inserted) == (5, 0)
    assert _entries_of(db, "A") == 5
    wait_for(lambda: query(db, "select count(*) from pg_stat_activity where application_name"
                               " = %s", (APP,)) == [(0,)])
