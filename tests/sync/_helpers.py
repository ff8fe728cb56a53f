"""Shared helpers for the sync suites: transports, server reads, store reads, waiting.

Everything here talks to real things: the throwaway PostgreSQL cluster (tests/pg.py),
the PostgREST-compatible gateway (tests/gateway.py) and real engine Stores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import cbor2
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.gateway import PostgrestGateway
from tests.pg import PostgresCluster
from walsync.engine import Store
from walsync.engine.record import CODEC_NONE
from walsync.engine.versions import Sibling, Version
from walsync.sync.merge import record_to_wire, sibling_to_wire
from walsync.sync.supabase import SupabaseTransport

#: a role that must log in with a password (the cluster trusts everyone else)
PASSWORD_ROLE = "walsync_pw_probe"
PASSWORD = "correct-horse-battery-staple-7f3a"


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def supabase_transport(gateway: PostgrestGateway, key: str | None = None,
                       timeout_seconds: float = 10.0) -> SupabaseTransport:
    return SupabaseTransport(gateway.url, key or gateway.service_role_key,
                             timeout_seconds=timeout_seconds)


def with_port(dsn: str, port: int) -> str:
    return make_conninfo(dsn, host="127.0.0.1", port=str(port))


def ensure_password_role(cluster: PostgresCluster) -> None:
    """A login role that needs a SCRAM password (one pg_hba line for it alone)."""
    assert cluster.base_dir is not None
    hba = cluster.data_dir / "pg_hba.conf"
    line = f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_roles where rolname = %s",
                              (PASSWORD_ROLE,)).fetchone()
        if not exists:
            conn.execute(f"create role {PASSWORD_ROLE} login password '{PASSWORD}'")
        text = hba.read_text()
        if line not in text:
            hba.write_text(line + text)  # before the trust lines: the first match wins
            conn.execute("select pg_reload_conf()")
            time.sleep(0.2)


def password_dsn(cluster: PostgresCluster, dbname: str, password: str) -> str:
    return make_conninfo(cluster.dsn(dbname, user=PASSWORD_ROLE), password=password)


def dbname(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


# -- entries ---------------------------------------------------------------------------


def entry(origin: str, lsn: int, key: str, value: Any, vv: dict[str, int] | None = None,
          *, hlc: int | None = None, idx: int = 0) -> dict[str, Any]:
    """A wire entry (``value`` None: a tombstone); ``vv`` defaults to {origin: lsn}."""
    data = None if value is None else cbor2.dumps(value)
    version = Version(origin, lsn, hlc if hlc is not None else (1_700_000_000_000 + lsn) << 16,
                      vv or {origin: lsn}, 0, data is None)
    return sibling_to_wire(key, idx, Sibling(version, CODEC_NONE, data))


def records(origin: str, count: int, keys_per_record: int, *, first_lsn: int = 1,
            prefix: str = "k") -> list[dict[str, Any]]:
    """``count`` records of ``keys_per_record`` distinct keys each, LSNs from ``first_lsn``."""
    out = []
    for n in range(count):
        lsn = first_lsn + n
        for i in range(keys_per_record):
            out.append(entry(origin, lsn, f"{prefix}/{origin}/{lsn}/{i}", {"n": n, "i": i},
                             idx=i))
    return out


def local_entries(store: Store) -> list[dict[str, Any]]:
    """Every entry of the store's own (local) records still in its WAL, with ``origin``."""
    store.flush()
    out = []
    for rec in store.wal_reader().read(0, store.shippable_lsn, 1 << 30, 1 << 40):
        if rec.local:
            for e in record_to_wire(rec.lsn, rec.ops):
                out.append({**e, "origin": store.node_id})
    return out


# -- reading the server ----------------------------------------------------------------


def query(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def server_entry_ids(dsn: str) -> list[tuple[str, int, str]]:
    return [(str(o), int(n), str(k)) for o, n, k in
            query(dsn, "select origin, lsn, key from walsync.entries order by pos")]


def server_siblings(dsn: str) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for key, origin, lsn in query(dsn, "select key, origin, lsn from walsync.siblings"):
        out.setdefault(key, []).append((origin, int(lsn)))
    return {k: sorted(v) for k, v in sorted(out.items())}


def server_winners(dsn: str) -> dict[str, tuple[str, int, bool]]:
    return {k: (o, int(n), bool(d)) for k, o, n, d in
            query(dsn, "select key, origin, lsn, deleted from walsync.state")}


def store_siblings(store: Store) -> dict[str, list[tuple[str, int]]]:
    return {key: sorted((s.version.origin, s.version.lsn) for s in sibs)
            for key, sibs in store.iter_siblings()}


def store_winners(store: Store) -> dict[str, tuple[str, int, bool]]:
    out = {}
    for key, sibs in store.iter_siblings():
        best = max(sibs, key=lambda s: s.version.order_key)
        out[key] = (best.version.origin, best.version.lsn, best.deleted)
    return out


def iter_chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and every exception chained to it (cause or context)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def assert_secret_absent(exc: BaseException, *secrets: str) -> None:
    for item in iter_chain(exc):
        for text in (str(item), repr(item), str(getattr(item, "hint", "") or "")):
            for secret in secrets:
                assert secret not in text, f"secret leaked in {type(item).__name__}: {text}"
