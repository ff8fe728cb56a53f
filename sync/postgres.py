"""The ``postgres`` transport: psycopg 3 straight to the database.

The only module that imports psycopg. It works through Supabase's transaction
pooler: no prepared statements (``prepare_threshold=None``) and no session
state — each call is one short transaction that sets its own timeout.
Credentials come from the DSN, which is never logged or put in an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
from typing import Any

import psycopg

from engine.errors import RemoteAuthError, RemoteUnavailableError, SyncError, SyncProtocolError

from .remote import (
    PUSH_ARRAYS,
    PushAck,
    RpcTransport,
    error_for_sqlstate,
    push_ack,
    push_arrays,
)

__all__ = ["PostgresTransport", "classify", "redact_dsn"]

_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")

#: push's array arguments, typed, in binary (``%b``); psycopg picks the narrowest integer
#: array type and sends lists of text, which the casts widen / parse
_PUSH_TYPES = {"p_lsn": "bigint[]", "p_idx": "integer[]", "p_key": "text[]",
               "p_deleted": "boolean[]", "p_data": "bytea[]", "p_codec": "smallint[]",
               "p_vv": "text[]::jsonb[]", "p_hlc": "bigint[]", "p_fence": "bigint[]",
               "p_value_hash": "text[]", "p_value_json": "text[]"}
_PUSH_SQL = ("select walsync_api.push(p_node => %s, p_through_lsn => %s, "
             + ", ".join(f"{name} => %b::{_PUSH_TYPES[name]}" for name in PUSH_ARRAYS)
             + ")").encode()


def redact_dsn(dsn: str) -> str:
    """A DSN fit for a message: host, port and database only."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    host = info.get("host", "localhost")
    return f"postgresql://{host}:{info.get('port', 5432)}/{info.get('dbname', '')}"


#: a refused login: libpq reports it without a SQLSTATE (28P01 / 28000 on the server), so
#: it is recognised by the server's message (or libpq's own, for a missing password)
_LOGIN_REFUSED = re.compile(
    r"password authentication failed|authentication failed for user|no pg_hba\.conf entry"
    r"|pg_hba\.conf rejects|role \"[^\"]*\" does not exist|no password supplied"
    r"|permission denied for database|tenant or user not found",
    re.IGNORECASE)


def _login_refused(exc: BaseException) -> str | None:
    """The server's reason when a connection attempt was refused for its credentials."""
    text = str(exc)
    match = _LOGIN_REFUSED.search(text)
    if match is None:
        return None
    fatal = re.search(r"FATAL:\s*([^\n]*)", text)
    return (fatal.group(1) if fatal else match.group(0)).strip()


def classify(exc: BaseException, where: str) -> SyncError:
    """Map a psycopg error to the sync error tree by SQLSTATE (credentials never included)."""
    state = getattr(exc, "sqlstate", None) or ""
    text = getattr(getattr(exc, "diag", None), "message_primary", None) or type(exc).__name__
    message = f"{where}: {text}" + (f" (SQLSTATE {state})" if state else "")
    if isinstance(exc, psycopg.OperationalError) and not state:
        refused = _login_refused(exc)
        if refused is not None:
            return RemoteAuthError(f"{where}: the server refused the login ({refused})")
        return RemoteUnavailableError(f"{where}: cannot reach the database ({type(exc).__name__})")
    if not state and isinstance(exc, psycopg.InterfaceError):
        return RemoteUnavailableError(f"{where}: connection lost ({type(exc).__name__})")
    return error_for_sqlstate(state, message)


class _Deadline:
    """Cuts a call's connection when the server stays silent past the deadline.

    psycopg has no client-side read timeout: on a half-open connection (the server
    host vanished without a FIN, a NAT forgot the flow) a call would wait for TCP to
    give up, a quarter of an hour. ``statement_timeout`` cannot help, the server
    never sees the statement. Shutting the socket down from a timer thread ends the
    wait with a connection error, which the caller retries on a new connection.
    """

    def __init__(self, conn: psycopg.Connection[Any], seconds: float) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._done = False
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:  # finish() cannot return while the socket is being cut
            if self._done:
                return
            self.fired = True
            try:
                fd = os.dup(self._conn.pgconn.socket)
            except (OSError, psycopg.Error):
                return
            with socket.socket(fileno=fd) as sock, contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        with self._lock:
            self._done = True
        self._timer.cancel()


class PostgresTransport(RpcTransport):
    """Thread rules: one thread at a time (the replicator's)."""

    name = "postgres"

    def __init__(self, dsn: str, *, timeout_seconds: float = 30.0,
                 connect_timeout_seconds: float = 10.0,
                 idle_in_transaction_seconds: float = 5.0,
                 answer_timeout_seconds: float | None = None) -> None:
        self._dsn = dsn
        self._timeout_ms = int(timeout_seconds * 1000)
        # The server ends a statement after timeout_seconds and says so; a call with
        # no answer at all well after that is on a dead connection (see _Deadline).
        self._answer_seconds = (answer_timeout_seconds if answer_timeout_seconds is not None
                                else timeout_seconds + 5.0)
        # A call's transaction holds locks from its result until its COMMIT (the
        # lock every push takes, a lease's row). A process frozen in between
        # (SIGSTOP, a VM pause, a GC pause) must not hold them for everyone: the
        # server ends a transaction left idle this long (the call's COMMIT then
        # fails, the caller sees RemoteUnavailableError and retries).
        self._idle_ms = max(1, int(idle_in_transaction_seconds * 1000))
        self._connect_timeout = max(1, int(connect_timeout_seconds))
        self._conn: psycopg.Connection[Any] | None = None
        self.where = redact_dsn(dsn)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = psycopg.connect(self._dsn, autocommit=True,
                                             connect_timeout=self._connect_timeout,
                                             prepare_threshold=None)
            except psycopg.Error as exc:
                raise classify(exc, f"connecting to {self.where}") from None
        return self._conn

    def call(self, function: str, args: dict[str, Any]) -> Any:
        if not _IDENT.match(function) or not all(_IDENT.match(k) for k in args):
            raise ValueError(f"bad function or argument name: {function}({', '.join(args)})")
        named = ", ".join(f"{k} => %({k})s" for k in args)
        params = {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in args.items()}
        return self._execute(function, f"select walsync_api.{function}({named})".encode(),
                             params)

    def _execute(self, function: str, sql: bytes, params: Any) -> Any:
        conn = self._connection()
        deadline = _Deadline(conn, self._answer_seconds)
        try:
            with conn.transaction():
                conn.execute(f"set local statement_timeout = {self._timeout_ms}; "
                             f"set local idle_in_transaction_session_timeout = {self._idle_ms}")
                row = conn.execute(sql, params).fetchone()
        except psycopg.Error as exc:
            deadline.finish()
            if deadline.fired:
                self._drop()
                raise RemoteUnavailableError(
                    f"{function} on {self.where}: no answer within {self._answer_seconds:g} s "
                    "(connection dropped)") from None
            error = classify(exc, f"{function} on {self.where}")
            if isinstance(error, RemoteUnavailableError):
                self._drop()
            raise error from None
        except RecursionError:  # psycopg's json.loads on a jsonb nested past the limit
            raise SyncProtocolError(f"{function} on {self.where}: the answer is nested too "
                                    "deeply to decode") from None
        finally:
            deadline.finish()
        return None if row is None else row[0]

    def push(self, node_id: str, through_lsn: int, entries: list[dict[str, Any]]) -> PushAck:
        """One call with the batch as parallel arrays, sent in binary: no JSON document
        to build or parse, bytes as bytea (version vectors and JSON views go as text,
        cast to jsonb by the server)."""
        arrays = push_arrays(entries, vv_as_text=True)
        return push_ack(self._execute("push", _PUSH_SQL, (
            node_id, through_lsn, *(arrays[name] for name in PUSH_ARRAYS))))

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def close(self) -> None:
        self._drop()
