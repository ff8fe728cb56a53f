"""The ``postgres`` transport: psycopg 3 straight to the database.

The only module that imports psycopg. It works through Supabase's transaction
pooler: no prepared statements (``prepare_threshold=None``) and no session
state — each call is one short transaction that sets its own timeout.
Credentials come from the DSN, which is never logged or put in an error.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import socket
import struct
import threading
from collections.abc import Sequence
from typing import Any

import orjson
import psycopg
from psycopg.abc import AdaptContext, Buffer

from walsync.engine.errors import (
    RemoteAuthError,
    RemoteRejectedError,
    RemoteSchemaError,
    RemoteUnavailableError,
    SyncConfigError,
    SyncError,
    SyncProtocolError,
)

from .remote import (
    PUSH_ARRAYS,
    RpcTransport,
    error_for_sqlstate,
    pull_page_of_rows,
    push_ack,
    push_arrays,
)
from .transport import PullPage, PushAck, WireBatch, WireEntry

__all__ = ["PostgresTransport", "check_dsn", "classify", "redact_dsn"]

_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")
#: a pull page as rows (sync/PROTOCOL.md, "Scoped pull")
_PULL_ROWS = (b"select * from walsync_api.pull_rows(p_node => %(n)s, p_after => %(a)s, "
              b"p_limit => %(l)s, p_prefixes => %(p)s::jsonb, p_group => %(g)s)")

#: push's array arguments: the element type each is sent as, in PostgreSQL's binary
#: array format (version vectors go as JSON text, which the server casts to jsonb)
_PUSH_ELEMENTS = {"p_lsn": "int8", "p_idx": "int4", "p_key": "text", "p_deleted": "bool",
                  "p_data": "bytea", "p_codec": "int2", "p_vv": "text", "p_hlc": "int8",
                  "p_fence": "int8", "p_value_hash": "text", "p_value_json": "text"}
_PUSH_CASTS = {"p_vv": "::jsonb[]"}
_PUSH_ARGS = ", ".join(f"{name} => %b{_PUSH_CASTS.get(name, '')}" for name in PUSH_ARRAYS)
_PUSH_SQL = ("select walsync_api.push(p_node => %s, p_through_lsn => %s, "
             + _PUSH_ARGS + ")").encode()
_PUSH_CLAIMED_SQL = ("select walsync_api.push_claimed(p_node => %s, p_incarnation => %s, "
                     "p_base_lsn => %s, p_after_lsn => %s, p_through_lsn => %s, "
                     + _PUSH_ARGS + ")").encode()


class _BinaryArray(bytes):
    """An array parameter already in PostgreSQL's binary format (its type: ``oid``)."""

    __slots__ = ()
    oid = 0
    element_oid = 0


class _BinaryArrayDumper(psycopg.adapt.Dumper):
    """Sends a _BinaryArray as it is, typed by its class."""

    format = psycopg.pq.Format.BINARY

    def __init__(self, cls: type, context: AdaptContext | None = None) -> None:
        super().__init__(cls, context)
        self.oid = cls.oid if issubclass(cls, _BinaryArray) else 0

    def dump(self, obj: Any) -> bytes:
        return obj  # type: ignore[no-any-return]  # a _BinaryArray: bytes already


class _JsonbBinaryLoader(psycopg.adapt.Loader):
    """jsonb in a binary result (a pull page's version vectors: one per row) read by
    orjson straight from the buffer, several times faster than psycopg's ``json.loads``
    of a copy; psycopg's own loader (``json.loads``) gives every value or error.

    orjson's answer is kept only when it is an object of integers, which it reads
    exactly as ``json`` does (it reads an integer past 64 bits as a float or not at
    all); anything else, or what it declines, is read by ``json.loads`` as before, so
    each value, or the error a damaged answer raises, is the one psycopg would give."""

    format = psycopg.pq.Format.BINARY

    def load(self, data: Buffer) -> Any:
        if data and data[0] != 1:
            raise psycopg.DataError(f"unknown jsonb binary format: {data[0]}")
        body = data[1:]
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError:
            value = None
        if type(value) is not dict:
            return json.loads(bytes(body))
        for n in value.values():
            if type(n) is not int:
                return json.loads(bytes(body))
        return value


#: a _BinaryArray class per element type (named as PostgreSQL names it): its oid is the
#: array type's, ``element_oid`` the element's
_ARRAY_CLASSES: dict[str, type[_BinaryArray]] = {
    name: type(f"_{name.capitalize()}Array", (_BinaryArray,), {
        "__slots__": (), "oid": psycopg.postgres.types[name].array_oid,
        "element_oid": psycopg.postgres.types[name].oid})
    for name in set(_PUSH_ELEMENTS.values())}
#: struct codes and sizes of the fixed-width element types
_FIXED = {"int8": ("q", 8), "int4": ("i", 4), "int2": ("h", 2), "bool": ("?", 1)}
#: one dimension: ndim, has nulls, element oid, length, lower bound
_ARRAY_HEADER = struct.Struct(">iiIii")
_NULL_ELEMENT = b"\xff\xff\xff\xff"


@functools.lru_cache(maxsize=32)
def _fixed_struct(code: str, size: int, n: int) -> struct.Struct:
    """``n`` elements of one fixed-width type, each after its length."""
    return struct.Struct(">" + f"i{code}" * n)


def _binary_array(element: str, values: list[Any]) -> _BinaryArray:
    """``values`` (None: a null element) as an array of ``element`` in binary format:
    a few list and join operations instead of a Python call per element."""
    cls = _ARRAY_CLASSES[element]
    oid = cls.element_oid
    n = len(values)
    if n == 0:
        return cls(struct.pack(">iiI", 0, 0, oid))
    fixed = _FIXED.get(element)
    if fixed is not None and None not in values:
        code, size = fixed
        flat = [x for v in values for x in (size, v)]
        return cls(_ARRAY_HEADER.pack(1, 0, oid, n, 1) + _fixed_struct(code, size, n).pack(*flat))
    parts = [b""]
    add = parts.append
    nulls = 0
    if fixed is not None:
        one = struct.Struct(f">i{fixed[0]}")
        for v in values:
            if v is None:
                add(_NULL_ELEMENT)
                nulls = 1
            else:
                add(one.pack(fixed[1], v))
    else:
        for v in values:
            if v is None:
                add(_NULL_ELEMENT)
                nulls = 1
                continue
            raw = v if type(v) is bytes else v.encode()
            add(len(raw).to_bytes(4, "big"))
            add(raw)
    parts[0] = _ARRAY_HEADER.pack(1, nulls, oid, n, 1)
    return cls(b"".join(parts))


def _push_params(entries: list[dict[str, Any]]) -> list[_BinaryArray]:
    """push's arrays of ``entries``, in order, encoded for sending; a malformed entry
    (a field of the wrong type or out of its column's range) raises RemoteRejectedError."""
    arrays = push_arrays(entries, vv_as_text=True, json_as_bytes=True)
    try:
        return [_binary_array(_PUSH_ELEMENTS[name], arrays[name]) for name in PUSH_ARRAYS]
    except (struct.error, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise RemoteRejectedError(f"push: a wire entry is malformed ({type(exc).__name__}: "
                                  f"{exc})") from None


def check_dsn(dsn: str) -> None:
    """Refuse a DSN libpq cannot parse with a SyncConfigError saying so (psycopg's own
    error may quote the DSN, password and all, so its words are not repeated)."""
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise SyncConfigError(
            "the PostgreSQL DSN cannot be read: it is neither key=value pairs nor a "
            "postgresql:// URI with known parameters",
            hint="set WALSYNC_PG_DSN like 'host=db.example.com port=5432 dbname=postgres "
                 "user=walsync' or 'postgresql://walsync@db.example.com:5432/postgres'"
        ) from None


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


_NO_DATABASE = re.compile(r'database "([^"]*)" does not exist')


def _unreachable_reason(exc: BaseException) -> str:
    """libpq's reason a connection failed ("Connection refused", "No such file or
    directory"): its words after the address, which carry no credentials."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    found = re.search(r"failed: ([^:]+)$", first)
    return found.group(1).strip() if found else type(exc).__name__


def classify(exc: BaseException, where: str) -> SyncError:
    """Map a psycopg error to the sync error tree by SQLSTATE (credentials never included)."""
    state = getattr(exc, "sqlstate", None) or ""
    text = getattr(getattr(exc, "diag", None), "message_primary", None) or type(exc).__name__
    message = f"{where}: {text}" + (f" (SQLSTATE {state})" if state else "")
    if isinstance(exc, psycopg.OperationalError) and not state:
        refused = _login_refused(exc)
        if refused is not None:
            return RemoteAuthError(f"{where}: the server refused the login ({refused})")
        missing = _NO_DATABASE.search(str(exc))
        if missing is not None:
            return SyncConfigError(
                f"{where}: the server has no database {missing.group(1)!r}",
                hint="create it (`createdb NAME`, then `walsync migrate`), or name an existing "
                     "database in the DSN (dbname=...)")
        return RemoteUnavailableError(f"{where}: cannot reach the database "
                                      f"({_unreachable_reason(exc)})")
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
        check_dsn(dsn)
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
        # the same statement timeout for a one-trip call (``_execute``): transaction-local,
        # as the next statement of the pipeline starts (nothing left on the session)
        self._timeout_sql = (f"select set_config('statement_timeout', '{self._timeout_ms}', "
                             "true)").encode()
        #: the server has no pull_rows (before migration 10): the plain pull it is
        self._no_pull_rows = False
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
            for cls in _ARRAY_CLASSES.values():
                self._conn.adapters.register_dumper(cls, _BinaryArrayDumper)
            self._conn.adapters.register_loader("jsonb", _JsonbBinaryLoader)
        return self._conn

    def call(self, function: str, args: dict[str, Any]) -> Any:
        if not _IDENT.match(function) or not all(_IDENT.match(k) for k in args):
            raise ValueError(f"bad function or argument name: {function}({', '.join(args)})")
        named = ", ".join(f"{k} => %({k})s" for k in args)
        params = {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in args.items()}
        return self._execute(function, f"select walsync_api.{function}({named})".encode(),
                             params)

    def _execute(self, function: str, sql: bytes, params: Any, *, rows: bool = False,
                 one_trip: bool = False) -> Any:
        """The call's one value; with ``rows``, every row it returns (in binary).

        With ``one_trip`` the call is sent as one pipeline — the timeout's ``set_config``,
        the call, then Sync — and the server commits the implicit transaction at the
        Sync, before it answers: no COMMIT round trip, so the locks the call takes are
        not held while its answer travels and the client acts on it (what serialised
        one tenant's pushes). Still one transaction: an error in the call rolls the
        whole of it back at the Sync. The transaction never waits for the client in
        ReadyForQuery, so the idle-in-transaction guard has nothing to end there (the
        only wait on the client inside it: libpq sends a batch past 64 KiB as it goes,
        and the Sync follows the call's last byte at once, with no answer awaited)."""
        conn = self._connection()
        deadline = _Deadline(conn, self._answer_seconds)
        try:
            if one_trip:
                with conn.pipeline():  # its exit sends the one Sync, then reads
                    conn.execute(self._timeout_sql)
                    cursor = conn.execute(sql, params)
                # read only now: a fetch inside the block would ask the server to flush
                # the answer and wait for it with the transaction still open
                row = cursor.fetchone()
            else:
                with conn.transaction():
                    conn.execute(f"set local statement_timeout = {self._timeout_ms}; "
                                 "set local idle_in_transaction_session_timeout = "
                                 f"{self._idle_ms}")
                    if rows:
                        every = conn.execute(sql, params, binary=True).fetchall()
                    else:
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
        if rows:
            return every
        return None if row is None else row[0]

    def pull(self, node_id: str, after: int, limit: int, *,
             prefixes: Sequence[str] | None = None, group: str | None = None) -> PullPage:
        """A page read as rows (``pull_rows``): the bytes as bytea, no JSON document to
        build and parse; the answer is the one ``pull`` / ``pull_scoped`` gives. A server
        without ``pull_rows`` (before migration 10) is asked the plain ``pull``."""
        if self._no_pull_rows and prefixes is None and group is None:
            return super().pull(node_id, after, limit)
        params = {"n": node_id, "a": after, "l": limit, "g": group,
                  "p": None if prefixes is None else json.dumps(list(prefixes))}
        try:
            got = self._execute("pull_rows", _PULL_ROWS, params, rows=True)
        except RemoteSchemaError:
            if prefixes is not None or group is not None:
                raise
            self._no_pull_rows = True
            return super().pull(node_id, after, limit)
        return pull_page_of_rows(got)

    def prepare_push(self, entries: WireBatch) -> None:
        """Encode a batch's arrays now, on any thread (no connection is touched), for
        the ``push`` that follows."""
        entries.keep(self.name, _push_params(entries))

    def push(self, node_id: str, through_lsn: int, entries: list[WireEntry]) -> PushAck:
        """One call with the batch as parallel arrays in PostgreSQL's binary format: no
        JSON document to build or parse, bytes as bytea (version vectors and JSON views
        go as text, cast to jsonb by the server)."""
        params = entries.kept(self.name) if isinstance(entries, WireBatch) else None
        if params is None:
            params = _push_params(entries)
        claim = entries.claim if isinstance(entries, WireBatch) else None
        if claim is not None:
            return push_ack(self._execute(
                "push_claimed", _PUSH_CLAIMED_SQL,
                (node_id, claim.incarnation, claim.base_lsn, claim.after_lsn, through_lsn,
                 *params), one_trip=True))
        return push_ack(self._execute("push", _PUSH_SQL, (node_id, through_lsn, *params),
                                      one_trip=True))

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def close(self) -> None:
        self._drop()
