"""The ``postgres`` transport: psycopg 3 straight to the database.

The only module that imports psycopg. It works through Supabase's transaction
pooler: no prepared statements (``prepare_threshold=None``) and no session
state — each call is one short transaction that sets its own timeout.
Credentials come from the DSN, which is never logged or put in an error.
"""

from __future__ import annotations

import json
import re
from typing import Any

import psycopg

from engine.errors import RemoteUnavailableError, SyncError

from .remote import (
    NodeStatus,
    PullPage,
    PushAck,
    error_for_sqlstate,
    node_status,
    pull_page,
    push_ack,
)

__all__ = ["PostgresTransport", "classify", "redact_dsn"]

_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


def redact_dsn(dsn: str) -> str:
    """A DSN fit for a message: host, port and database only."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    host = info.get("host", "localhost")
    return f"postgresql://{host}:{info.get('port', 5432)}/{info.get('dbname', '')}"


def classify(exc: BaseException, where: str) -> SyncError:
    """Map a psycopg error to the sync error tree by SQLSTATE (credentials never included)."""
    state = getattr(exc, "sqlstate", None) or ""
    text = getattr(getattr(exc, "diag", None), "message_primary", None) or type(exc).__name__
    message = f"{where}: {text}" + (f" (SQLSTATE {state})" if state else "")
    if isinstance(exc, psycopg.OperationalError) and not state:
        return RemoteUnavailableError(f"{where}: cannot reach the database ({type(exc).__name__})")
    if not state and isinstance(exc, psycopg.InterfaceError):
        return RemoteUnavailableError(f"{where}: connection lost ({type(exc).__name__})")
    return error_for_sqlstate(state, message)


class PostgresTransport:
    """Thread rules: one thread at a time (the replicator's)."""

    name = "postgres"

    def __init__(self, dsn: str, *, timeout_seconds: float = 30.0,
                 connect_timeout_seconds: float = 10.0) -> None:
        self._dsn = dsn
        self._timeout_ms = int(timeout_seconds * 1000)
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
        sql = f"select walsync_api.{function}({named})"
        conn = self._connection()
        try:
            with conn.transaction():
                conn.execute(f"set local statement_timeout = {self._timeout_ms}")
                row = conn.execute(sql.encode(), params).fetchone()
        except psycopg.Error as exc:
            error = classify(exc, f"{function} on {self.where}")
            if isinstance(error, RemoteUnavailableError):
                self._drop()
            raise error from None
        return None if row is None else row[0]

    def push(self, node_id: str, through_lsn: int, entries: list[dict[str, Any]]) -> PushAck:
        return push_ack(self.call("push", {"p_node": node_id, "p_through_lsn": through_lsn,
                                           "p_entries": entries}))

    def pull(self, node_id: str, after: int, limit: int) -> PullPage:
        return pull_page(self.call("pull", {"p_node": node_id, "p_after": after,
                                            "p_limit": limit}))

    def node_status(self, node_id: str) -> NodeStatus:
        return node_status(self.call("node_status", {"p_node": node_id}))

    def head(self) -> int:
        return int(self.call("head", {})["head"])

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def close(self) -> None:
        self._drop()
