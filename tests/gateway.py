"""A small PostgREST-compatible gateway, so supabase-py can be tested against a real database.

PostgREST is not packaged here. ``PostgrestGateway`` serves the part of its HTTP API that
supabase-py's RPC calls use, on ``http://127.0.0.1:<free port>/rest/v1/`` from a background
thread, and does what PostgREST does per request (src/PostgREST/Auth/Jwt.hs,
Query/PreQuery.hs, Error.hs):

* JWT: ``Authorization: Bearer <jwt>``, HS256 with ``jwt_secret``; a bad token -> 401
  PGRST301, expired/not yet valid (30 s skew) -> 401 PGRST303; no header -> the anon role.
  The role is the ``role`` claim (missing -> anon). The ``apikey`` header is not checked
  (on Supabase the API gateway in front of PostgREST does that).
* Schema: ``Content-Profile`` (POST) / ``Accept-Profile`` (GET), default the first exposed
  schema; one not in ``schemas`` (PostgREST's db-schemas) -> 406 PGRST106.
* One transaction per request on a pooled connection as ``authenticator``: the role's
  settings (``ALTER ROLE anon SET statement_timeout``), then ``set_config('role', <role>,
  true)`` (= SET LOCAL ROLE), ``request.jwt.claims`` (the claims with the role),
  ``request.jwt.claim.role``, ``request.method``, ``request.path``, ``request.headers`` and
  ``search_path`` (the schema, then public); GET runs read-only.
* ``POST /rest/v1/rpc/<fn>``: a JSON object of named arguments, typed like PostgREST does
  with ``json_to_record``; a function with one unnamed json/jsonb argument gets the whole
  body. ``GET /rest/v1/rpc/<fn>?a=1`` casts query-string values. No matching function ->
  404 PGRST202, several -> 300 PGRST203. Result: a scalar function's JSON value, a composite
  one's object, a set-returning one's array capped at ``max_rows`` (db-max-rows), void ->
  204.
* ``GET /rest/v1/<table>`` (``select=*``, ``limit``): ``select *`` as the request's role,
  so grants and RLS apply; unknown table -> 404 PGRST205.
* Errors: ``{"code", "message", "details", "hint"}`` with PostgREST's SQLSTATE -> HTTP
  table (42501 -> 401 for anon, 403 otherwise; 23505 -> 409; 40001 -> 500; P0001 -> 400;
  ``PTnnn`` -> nnn; unknown codes -> 400), a lost or refused database connection -> 503
  PGRST000/PGRST001 (and the pool is flushed, as PostgREST does), plus
  ``Proxy-Status: PostgREST; error=<code>``.

Keys: ``gateway.service_role_key``, ``gateway.anon_key``, ``gateway.mint({...claims})`` (or
the module's ``mint_jwt``), signed with ``TEST_JWT_SECRET`` unless told otherwise.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import jwt
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.pq import TransactionStatus

__all__ = [
    "TEST_JWT_SECRET",
    "PostgrestGateway",
    "anon_key",
    "mint_jwt",
    "service_role_key",
]

TEST_JWT_SECRET = "walsync-test-jwt-secret-with-at-least-32-characters"
JWT_SKEW_SECONDS = 30  # PostgREST's allowedSkewSeconds


def mint_jwt(claims: Mapping[str, Any], secret: str = TEST_JWT_SECRET, *,
             expires_in: float | None = 3600) -> str:
    """An HS256 JWT shaped like Supabase's keys (iss, iat, exp) with ``claims`` on top."""
    now = int(time.time())
    payload: dict[str, Any] = {"iss": "supabase", "iat": now}
    if expires_in is not None:
        payload["exp"] = now + int(expires_in)
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")


API_KEY_LIFETIME = 10 * 365 * 86400  # Supabase's anon/service_role keys last ~10 years


def anon_key(secret: str = TEST_JWT_SECRET) -> str:
    return mint_jwt({"role": "anon"}, secret, expires_in=API_KEY_LIFETIME)


def service_role_key(secret: str = TEST_JWT_SECRET) -> str:
    return mint_jwt({"role": "service_role"}, secret, expires_in=API_KEY_LIFETIME)


@dataclass
class ApiError(Exception):
    """An error response: status and PostgREST's JSON error body."""

    status: int
    code: str
    message: str
    details: str | None = None
    hint: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "details": self.details, "hint": self.hint,
                "message": self.message}


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Routine:
    signature: str
    retset: bool
    rettype: str
    returns_rows: bool
    nargs: int
    ndefaults: int
    names: list[str]
    types: list[str]

    def matches(self, keys: set[str]) -> bool:
        required = set(self.names[: self.nargs - self.ndefaults])
        return keys <= set(self.names) and required <= keys and "" not in self.names

    @property
    def takes_whole_body(self) -> bool:
        return self.nargs == 1 and self.names == [""] and self.types[0] in ("json", "jsonb")


_ROUTINES_SQL = """
SELECT p.oid::regprocedure::text, p.proretset, format_type(p.prorettype, NULL),
       (t.typrelid <> 0 OR p.prorettype = 'record'::regtype), p.pronargs, p.pronargdefaults,
       coalesce(p.proargnames, '{}'), p.proargmodes::text[],
       array(SELECT format_type(a.oid, NULL)
             FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a(oid, n) ORDER BY a.n)
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
JOIN pg_type t ON t.oid = p.prorettype
WHERE n.nspname = %s AND p.proname = %s AND p.prokind = 'f'
"""

_ROLE_SETTINGS_SQL = """
SELECT unnest(s.setconfig)
FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
WHERE r.rolname = %s
  AND s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
ORDER BY s.setdatabase
"""


def _http_status(sqlstate: str, message: str, authed: bool) -> int:
    """PostgREST's mapSQLtoHTTP (src/PostgREST/Error.hs)."""
    exact = {"23503": 409, "23505": 409, "25006": 405, "53400": 500, "57P01": 503,
             "P0001": 400, "42883": 404, "42P01": 404, "42P17": 500}
    if sqlstate == "42501":
        return 403 if authed else 401
    if sqlstate == "22023":  # nonexistent role from the JWT
        return 401 if message.startswith("role") and message.endswith("does not exist") else 400
    if sqlstate == "21000":
        return 400 if message.endswith("requires a WHERE clause") else 500
    if sqlstate in exact:
        return exact[sqlstate]
    if sqlstate.startswith("PT") and sqlstate[2:].isdigit():
        return int(sqlstate[2:])
    prefix = {"08": 503, "09": 500, "0L": 403, "0P": 403, "25": 500, "28": 403, "2D": 500,
              "38": 500, "39": 500, "3B": 500, "40": 500, "53": 503, "54": 500, "55": 500,
              "57": 500, "58": 500, "F0": 500, "HV": 500, "P0": 500, "XX": 500}
    return prefix.get(sqlstate[:2], 400)


def _db_error(exc: psycopg.Error, authed: bool, connecting: bool = False) -> ApiError:
    sqlstate = exc.sqlstate
    if sqlstate is None:  # no server error: connecting failed, or the connection broke
        if connecting:
            return ApiError(503, "PGRST000", "Database connection error. Retrying the "
                            "connection.", details=str(exc).strip() or None)
        return ApiError(503, "PGRST001", "Database client error. Retrying the connection.",
                        details=str(exc).strip() or None)
    diag = exc.diag
    message = diag.message_primary or str(exc)
    status = _http_status(sqlstate, message, authed)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    return ApiError(status, sqlstate, message, diag.message_detail, diag.message_hint, headers)


class PostgrestGateway:
    """``with PostgrestGateway(dsn, schemas=["walsync_api"]) as gw:`` then
    ``create_client(gw.url, gw.service_role_key, ...)``.

    ``dsn`` names the database (any user: the gateway connects as ``authenticator``).
    """

    def __init__(self, dsn: str, *, schemas: Sequence[str] = ("public",),
                 jwt_secret: str = TEST_JWT_SECRET, anon_role: str | None = "anon",
                 max_rows: int | None = 1000, pool_size: int = 4,
                 extra_search_path: Sequence[str] = ("public",)) -> None:
        if not schemas:
            raise ValueError("at least one exposed schema is needed")
        self.dsn = make_conninfo(dsn, user="authenticator", connect_timeout="5")
        self.schemas = list(schemas)
        self.jwt_secret = jwt_secret
        self.anon_role = anon_role
        self.max_rows = max_rows
        self.pool_size = pool_size
        self.extra_search_path = list(extra_search_path)
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status), in order
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()  # open client connections
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> PostgrestGateway:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.gateway = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="postgrest-gateway", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for sock in list(self._sockets):  # end keep-alive connections: clients see it down
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.reset_pool()

    def __enter__(self) -> PostgrestGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset_pool(self) -> None:
        """Close the idle database connections (the next requests open new ones)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()

    @property
    def port(self) -> int:
        assert self._server is not None, "gateway not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The "Supabase project URL" to give create_client (REST is under /rest/v1)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def rest_url(self) -> str:
        return self.url + "/rest/v1"

    # -- keys ----------------------------------------------------------------------------
    def mint(self, claims: Mapping[str, Any], *, expires_in: float | None = 3600) -> str:
        return mint_jwt(claims, self.jwt_secret, expires_in=expires_in)

    @property
    def anon_key(self) -> str:
        return anon_key(self.jwt_secret)

    @property
    def service_role_key(self) -> str:
        return service_role_key(self.jwt_secret)

    # -- connections ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _connection(self, authed: bool) -> Iterator[psycopg.Connection[Any]]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            try:
                conn = psycopg.connect(self.dsn, autocommit=True)
            except psycopg.Error as exc:
                raise _db_error(exc, authed, connecting=True) from None
        try:
            yield conn
        except psycopg.Error as exc:
            if conn.broken or exc.sqlstate is None or exc.sqlstate.startswith("08") \
                    or exc.sqlstate == "57P01":
                self.reset_pool()  # PostgREST releases its whole pool on a connection error
            raise _db_error(exc, authed) from None
        finally:
            keep = not conn.broken and conn.info.transaction_status == TransactionStatus.IDLE
            with self._lock:
                if keep and len(self._idle) < self.pool_size:
                    self._idle.append(conn)
                    conn = None
            if conn is not None:
                conn.close()

    # -- request handling ----------------------------------------------------------------
    def handle(self, method: str, target: str, headers: Mapping[str, str],
               body: bytes) -> Response:
        parts = urlsplit(target)
        path = unquote(parts.path)
        try:
            response = self._route(method, path, parse_qsl(parts.query, keep_blank_values=True),
                                   {k.lower(): v for k, v in headers.items()}, body)
        except ApiError as err:
            payload = json.dumps(err.body()).encode()
            response = Response(err.status, payload, {
                "Content-Type": "application/json; charset=utf-8",
                "Proxy-Status": f"PostgREST; error={err.code}", **err.headers})
        self.requests.append((method, path, response.status))
        return response

    def _route(self, method: str, path: str, query: list[tuple[str, str]],
               headers: dict[str, str], body: bytes) -> Response:
        match = re.fullmatch(r"/rest/v1/(?:(rpc)/)?([^/]+)/?", path)
        if match is None:
            raise ApiError(404, "PGRST125", "Invalid path specified in request URL")
        is_rpc, name = bool(match.group(1)), match.group(2)
        if method not in ("GET", "HEAD", "POST") or (method == "POST" and not is_rpc):
            raise ApiError(405, "PGRST117", f"Unsupported HTTP method: {method}")
        profile = headers.get("accept-profile" if method in ("GET", "HEAD") else
                              "content-profile")
        schema = profile or self.schemas[0]
        if schema not in self.schemas:
            raise ApiError(406, "PGRST106", f"Invalid schema: {schema}",
                           hint="Only the following schemas are exposed: "
                                + ", ".join(self.schemas))
        role, claims = self._authenticate(headers.get("authorization"))
        authed = role != self.anon_role
        with self._connection(authed) as conn, conn.transaction():
            if method != "POST":
                conn.execute("SET TRANSACTION READ ONLY")
            self._set_request_context(conn, method, path, headers, schema, role, claims)
            if is_rpc:
                response = self._call(conn, schema, name, method, query, body)
            else:
                response = self._select(conn, schema, name, query)
        if method == "HEAD":
            response.body = b""
        return response

    def _authenticate(self, authorization: str | None) -> tuple[str, dict[str, Any]]:
        if authorization is None or not authorization.strip():
            if self.anon_role is None:
                raise ApiError(401, "PGRST302", "Anonymous access is disabled",
                               headers={"WWW-Authenticate": "Bearer"})
            return self.anon_role, {"role": self.anon_role}
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()

        def invalid(code: str, message: str, details: str | None = None) -> ApiError:
            return ApiError(401, code, message, details, headers={
                "WWW-Authenticate": f'Bearer error="invalid_token", '
                                    f'error_description="{message}"'})

        if scheme.lower() != "bearer" or not token:
            raise invalid("PGRST301", "Empty JWT is sent in Authorization header")
        if token.count(".") != 2:
            raise invalid("PGRST301", f"Expected 3 parts in JWT; got {token.count('.') + 1}")
        try:
            claims = jwt.decode(token, self.jwt_secret, algorithms=["HS256"],
                                options={"verify_exp": False, "verify_nbf": False,
                                         "verify_iat": False, "verify_aud": False})
        except jwt.InvalidAlgorithmError as exc:
            raise invalid("PGRST301", "Wrong or unsupported encoding algorithm",
                          str(exc)) from None
        except jwt.InvalidSignatureError:
            raise invalid("PGRST301", "No suitable key or wrong key type",
                          "None of the keys was able to decode the JWT") from None
        except jwt.PyJWTError:
            raise invalid("PGRST301", "JWT couldn't be decoded") from None
        now = time.time()
        for claim, late, message in (("exp", False, "JWT expired"),
                                     ("nbf", True, "JWT not yet valid"),
                                     ("iat", True, "JWT issued at future")):
            if claim not in claims:
                continue
            value = claims[claim]
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise invalid("PGRST303", f"The JWT '{claim}' claim must be a number")
            if (value > now + JWT_SKEW_SECONDS) if late else (value < now - JWT_SKEW_SECONDS):
                raise invalid("PGRST303", message)
        role = claims.get("role", self.anon_role)
        if role is None:
            raise ApiError(401, "PGRST302", "Anonymous access is disabled",
                           headers={"WWW-Authenticate": "Bearer"})
        role = role if isinstance(role, str) else json.dumps(role)
        return role, {**claims, "role": role}

    def _set_request_context(self, conn: psycopg.Connection[Any], method: str, path: str,
                             headers: dict[str, str], schema: str, role: str,
                             claims: dict[str, Any]) -> None:
        settings: list[tuple[str, str]] = []
        for (item,) in conn.execute(_ROLE_SETTINGS_SQL, (role,)).fetchall():
            key, _, value = str(item).partition("=")
            settings.append((key, value))
        search_path = ", ".join(sql.Identifier(s).as_string(conn)
                                for s in [schema, *self.extra_search_path])
        settings += [
            ("search_path", search_path),
            ("role", role),  # = SET LOCAL ROLE; after the role's settings, like PostgREST
            ("request.jwt.claims", json.dumps(claims)),
            ("request.jwt.claim.role", role),
            ("request.method", method),
            ("request.path", path),
            ("request.headers", json.dumps({k: v for k, v in headers.items()
                                            if k not in ("authorization", "apikey")})),
        ]
        query = sql.SQL("SELECT {}").format(sql.SQL(", ").join(
            sql.SQL("set_config({}, {}, true)").format(sql.Literal(k), sql.Literal(v))
            for k, v in settings))
        conn.execute(query)

    def _find_routine(self, conn: psycopg.Connection[Any], schema: str, name: str,
                      keys: set[str], post: bool) -> _Routine:
        routines = [_Routine(sig, retset, rettype, rows, nargs, ndefaults,
                             self._input_names(names, modes, nargs), types)
                    for sig, retset, rettype, rows, nargs, ndefaults, names, modes, types
                    in conn.execute(_ROUTINES_SQL, (schema, name)).fetchall()]
        found = [r for r in routines if r.matches(keys)]
        if not found and post:
            found = [r for r in routines if r.takes_whole_body]
        if len(found) == 1:
            return found[0]
        if found:
            raise ApiError(300, "PGRST203",
                           "Could not choose the best candidate function between: "
                           + ", ".join(r.signature for r in found),
                           hint="Try renaming the parameters or the function itself in the "
                                "database so function overloading can be resolved")
        listed = ", ".join(sorted(keys))
        raise ApiError(
            404, "PGRST202",
            f"Could not find the function {schema}.{name}"
            + (f"({listed})" if keys else " without parameters") + " in the schema cache",
            details=f"Searched for the function {schema}.{name}"
            + (f" with parameter{'s' if len(keys) > 1 else ''} {listed}" if keys
               else " without parameters")
            + (" or with a single unnamed json/jsonb parameter" if post else "")
            + ", but no matches were found in the schema cache.")

    @staticmethod
    def _input_names(names: list[str], modes: list[str] | None, nargs: int) -> list[str]:
        if modes is None:
            return (list(names) + [""] * nargs)[:nargs]
        return [n for n, m in zip(names, modes, strict=False) if m in ("i", "b", "v")]

    def _call(self, conn: psycopg.Connection[Any], schema: str, name: str, method: str,
              query: list[tuple[str, str]], body: bytes) -> Response:
        post = method == "POST"
        if post:
            try:
                args = json.loads(body) if body.strip() else {}
            except ValueError:
                raise ApiError(400, "PGRST102", "Empty or invalid json") from None
            if not isinstance(args, dict):
                raise ApiError(400, "PGRST102", "Only a JSON object of named arguments is "
                               "supported by the test gateway")
        else:
            args = dict(query)
        routine = self._find_routine(conn, schema, name, set(args), post)
        fn = sql.Identifier(schema, name)
        params: list[Any] = []
        prefix: sql.Composable = sql.SQL("")
        if routine.takes_whole_body and not routine.matches(set(args)):
            call = sql.SQL("{}({}::{})").format(fn, sql.Placeholder(),
                                                 sql.SQL(routine.types[0]))
            params.append(body.decode() if body.strip() else "{}")
        elif not args:
            call = sql.SQL("{}()").format(fn)
        elif post:  # typed from the JSON body, like PostgREST's json_to_record
            types = dict(zip(routine.names, routine.types, strict=True))
            columns = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(k),
                                                                 sql.SQL(types[k])) for k in args)
            prefix = sql.SQL("json_to_record({}::json) AS _a({}) CROSS JOIN LATERAL ").format(
                sql.Placeholder(), columns)
            params.append(json.dumps(args))
            call = sql.SQL("{}({})").format(fn, sql.SQL(", ").join(
                sql.SQL("{} => _a.{}").format(sql.Identifier(k), sql.Identifier(k))
                for k in args))
        else:  # query-string values are text, cast to the argument types
            types = dict(zip(routine.names, routine.types, strict=True))
            call = sql.SQL("{}({})").format(fn, sql.SQL(", ").join(
                sql.SQL("{} => {}::{}").format(sql.Identifier(k), sql.Placeholder(),
                                               sql.SQL(types[k])) for k in args))
            params += list(args.values())
        limit = sql.SQL("") if self.max_rows is None else sql.SQL(" LIMIT {}").format(
            sql.Literal(self.max_rows))
        if routine.rettype == "void":
            conn.execute(sql.SQL("SELECT FROM {}{} AS _f").format(prefix, call), params)
            return Response(204)
        if routine.returns_rows:
            source = sql.SQL("SELECT _f.* FROM {}{} AS _f").format(prefix, call)
            value = sql.SQL("_c")
        else:
            source = sql.SQL("SELECT _f.v FROM {}{} AS _f(v)").format(prefix, call)
            value = sql.SQL("_c.v")
        if routine.retset:
            stmt = sql.SQL("SELECT coalesce(json_agg({}), '[]'::json)::text, count(*) "
                           "FROM ({}{}) AS _c").format(value, source, limit)
        else:
            stmt = sql.SQL("SELECT to_json({})::text, 1 FROM ({}) AS _c").format(
                value, source)
        row = conn.execute(stmt, params).fetchone()
        assert row is not None
        text, count = row
        return self._json(text if text is not None else "null", count)

    def _select(self, conn: psycopg.Connection[Any], schema: str, table: str,
                query: list[tuple[str, str]]) -> Response:
        limit = self.max_rows
        for key, value in query:
            if key == "select" and value.strip() == "*":
                continue
            if key == "limit" and value.isdigit():
                limit = int(value) if limit is None else min(limit, int(value))
                continue
            raise ApiError(400, "PGRST127", "Feature not implemented",
                           details=f"the test gateway reads tables with select=* and limit "
                                   f"only, not {key}={value}")
        found = conn.execute(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r','v','m','f','p')",
            (schema, table)).fetchone()
        if found is None:
            raise ApiError(404, "PGRST205",
                           f"Could not find the table '{schema}.{table}' in the schema cache")
        stmt = sql.SQL("SELECT coalesce(json_agg(_t), '[]'::json)::text, count(*) "
                       "FROM (SELECT * FROM {}{}) AS _t").format(
            sql.Identifier(schema, table),
            sql.SQL("") if limit is None else sql.SQL(" LIMIT {}").format(sql.Literal(limit)))
        row = conn.execute(stmt).fetchone()
        assert row is not None
        return self._json(row[0], row[1])

    @staticmethod
    def _json(text: str, count: int) -> Response:
        content_range = f"0-{count - 1}/*" if count else "*/*"
        return Response(200, text.encode(), {"Content-Type": "application/json; charset=utf-8",
                                             "Content-Range": content_range})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects
    timeout = 60  # idle keep-alive connections end after this
    disable_nagle_algorithm = True  # else every response waits ~40 ms for a delayed ACK
    server_version = "postgrest-test-gateway"

    def setup(self) -> None:
        super().setup()
        self.server.gateway._sockets.add(self.connection)  # type: ignore[attr-defined]

    def finish(self) -> None:
        self.server.gateway._sockets.discard(self.connection)  # type: ignore[attr-defined]
        super().finish()

    def _serve(self) -> None:
        gateway: PostgrestGateway = self.server.gateway  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        response = gateway.handle(self.command, self.path, dict(self.headers.items()), body)
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if response.body and self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_POST = do_HEAD = do_PATCH = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass
