"""Apply the server schema: the numbered SQL files under sync/migrations/.

File names follow the Supabase CLI (``<UTC timestamp>_<name>.sql``), so the
same files can be copied into a Supabase project's ``supabase/migrations``.
Applying is idempotent: applied versions are recorded in
``walsync.schema_migrations``, each file runs in its own transaction, and a
transaction-scoped advisory lock keeps two migrators from racing. When an
object the files create is missing although its file is recorded (say,
``drop schema walsync_api cascade``), every file is applied again (each is
safe to apply more than once): ``walsync migrate`` is the repair the sync
errors point to.

Every function is defined once, in the default files: each always filters
on the caller's tenant ('' while tenant mode is off). Tenant mode
(``migrate(dsn, tenant_mode=True)``, ``walsync migrate --tenant-mode``)
applies the files under ``migrations/tenant/`` after the default ones; they
hold no function, only what tenant mode adds (its setting, keys that lead with
the tenant, Row Level Security policies, grants, the functions' owner). A
plain run never turns it on; once on (a tenant file is recorded, or one of
those it replaced), every run that applies or re-applies a default file
applies the tenant files again, because a default file's closing REVOKE takes
back their grants to ``authenticated``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from walsync.engine.errors import SyncConfigError

from .postgres import check_dsn, classify, redact_dsn

__all__ = ["MIGRATIONS_DIR", "RETIRED_TENANT_VERSIONS", "TENANT_MIGRATIONS_DIR",
           "MigrationReport", "is_claim_name", "list_migrations", "migrate"]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
TENANT_MIGRATIONS_DIR = MIGRATIONS_DIR / "tenant"
_NAME = re.compile(r"^(\d{14})_([a-z0-9_]+)\.sql$")
#: tenant files of earlier releases, each a copy of the API functions with a
#: tenant filter; 20261207000007 made the functions tenant-aware once and for
#: all and 20261207000107 holds the rest. A database that recorded one of them
#: is in tenant mode.
RETIRED_TENANT_VERSIONS = ("20261123000101", "20261207000104", "20261207000105")
#: a JWT claim name: plain (tenant_id) or namespaced (https://example.com/tenant)
_CLAIM = re.compile(r"^[A-Za-z0-9_.:/-]{1,200}$")


def is_claim_name(name: str) -> bool:
    """Whether ``name`` can name a JWT claim for tenant mode (it is spliced into SQL
    as a literal, so only these characters are taken)."""
    return _CLAIM.match(name) is not None


@dataclass(frozen=True)
class MigrationReport:
    applied: list[str]
    already: list[str]
    #: objects that were missing although their migration was recorded (re-created)
    repaired: list[str] = field(default_factory=list)
    #: the JWT claim naming the tenant when tenant mode is on, else None
    tenant_claim: str | None = None
    #: the server's identity (walsync.server): clients keep it beside their
    #: acknowledged LSN and re-ship everything to a server with another one
    server_id: str | None = None


_OBJECTS = re.compile(
    r"(create\s+(?:or\s+replace\s+)?|drop\s+)(function|table|view)\s+"
    r"(?:if\s+(?:not\s+)?exists\s+)?(walsync(?:_api)?\.[a-z_][a-z0-9_]*)", re.IGNORECASE)


def _missing_objects(conn: psycopg.Connection[Any], tenant: bool) -> list[str]:
    """Tables, views and functions the recorded migration files leave in place (created,
    and not dropped by a later one) that the database lacks. Files not yet applied are
    not asked about: an upgrade is not a repair."""
    recorded = {str(v) for (v,) in conn.execute(
        "select version from walsync.schema_migrations").fetchall()}
    expected: dict[str, str] = {}
    files = list_migrations() + (list_migrations(tenant=True) if tenant else [])
    for version, path in files:
        if version not in recorded:
            continue
        for verb, kind, name in _OBJECTS.findall(path.read_text()):
            if verb.lower().startswith("drop"):
                expected.pop(name.lower(), None)
            else:
                expected[name.lower()] = kind.lower()
    missing = []
    for name, kind in expected.items():
        schema, _, obj = name.partition(".")
        if kind == "function":
            row = conn.execute(
                "select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace "
                "where n.nspname = %s and p.proname = %s", (schema, obj)).fetchone()
        else:
            row = conn.execute("select to_regclass(%s)", (name,)).fetchone()
            row = row if row and row[0] is not None else None
        if row is None:
            missing.append(name)
    return missing


def list_migrations(*, tenant: bool = False) -> list[tuple[str, Path]]:
    """The default files in order, or with ``tenant`` the tenant-mode files."""
    out = []
    for path in sorted((TENANT_MIGRATIONS_DIR if tenant else MIGRATIONS_DIR).glob("*.sql")):
        m = _NAME.match(path.name)
        if m:
            out.append((m.group(1), path))
    return out


def _apply(conn: psycopg.Connection[Any], version: str, path: Path, force: bool) -> bool:
    """Apply one file in its own transaction unless it is recorded (and not ``force``)."""
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext('walsync.migrate'))")
        conn.execute("create schema if not exists walsync")
        conn.execute(
            "create table if not exists walsync.schema_migrations ("
            " version text primary key,"
            " name text not null,"
            " applied_at timestamptz not null default now())"
        )
        conn.execute("alter table walsync.schema_migrations enable row level security")
        row = conn.execute(
            "select 1 from walsync.schema_migrations where version = %s", (version,)
        ).fetchone()
        if row and not force:
            return False
        conn.execute(path.read_bytes())
        conn.execute(
            "insert into walsync.schema_migrations (version, name) values (%s, %s)"
            " on conflict (version) do nothing",
            (version, path.name),
        )
        return True


def _tenant_mode_on(conn: psycopg.Connection[Any]) -> bool:
    versions = [version for version, _ in list_migrations(tenant=True)]
    versions += RETIRED_TENANT_VERSIONS
    row = conn.execute("select exists (select 1 from walsync.schema_migrations "
                       "where version = any(%s))", (versions,)).fetchone()
    return bool(row and row[0])


def migrate(dsn: str, *, tenant_mode: bool = False,
            tenant_claim: str | None = None) -> MigrationReport:
    """Apply every migration not yet applied; needs a role that may create schemas.

    ``tenant_mode`` turns tenant mode on (it stays on); ``tenant_claim`` (with
    ``tenant_mode``) names the JWT claim that carries the tenant.
    """
    if tenant_claim is not None and not tenant_mode:
        raise SyncConfigError("a tenant claim needs tenant mode (--tenant-mode)")
    if tenant_claim is not None and not is_claim_name(tenant_claim):
        raise SyncConfigError(f"tenant claim {tenant_claim!r} is not a JWT claim name "
                              "(letters, digits and _ . : / -)")
    check_dsn(dsn)
    applied: list[str] = []
    already: list[str] = []
    claim: str | None = None
    try:
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
            recorded = conn.execute(
                "select to_regclass('walsync.schema_migrations') is not null").fetchone()
            was_recorded = bool(recorded and recorded[0])
            tenant_on = was_recorded and _tenant_mode_on(conn)
            tenant = tenant_mode or tenant_on
            repaired = _missing_objects(conn, tenant_on) if was_recorded else []
            for version, path in list_migrations():
                done = _apply(conn, version, path, force=bool(repaired))
                (applied if done else already).append(path.name)
            if tenant:
                # after any default file ran, its closing REVOKE took back the tenant grants
                force = bool(repaired or applied)
                for version, path in list_migrations(tenant=True):
                    done = _apply(conn, version, path, force=force)
                    (applied if done else already).append(path.name)
                with conn.transaction():
                    if tenant_claim is not None:
                        conn.execute("update walsync.tenant_settings set claim = %s "
                                     "where id = 1 and claim is distinct from %s",
                                     (tenant_claim, tenant_claim))
                    row = conn.execute(
                        "select claim from walsync.tenant_settings where id = 1").fetchone()
                    claim = None if row is None else str(row[0])
            server_id = _server_identity(conn)
    except psycopg.Error as exc:
        raise classify(exc, f"migrating {redact_dsn(dsn)}") from None
    return MigrationReport(applied, already, repaired, claim, server_id)


def _server_identity(conn: psycopg.Connection[Any]) -> str:
    """The server's id, made if its row is missing (a table emptied by hand): a
    server without one could not tell its clients it is another server."""
    with conn.transaction():
        conn.execute("insert into walsync.server (id) values (1) on conflict do nothing")
        row = conn.execute("select server_id from walsync.server where id = 1").fetchone()
    assert row is not None
    return str(row[0])
