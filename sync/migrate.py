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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from .postgres import classify, redact_dsn

__all__ = ["MIGRATIONS_DIR", "MigrationReport", "list_migrations", "migrate"]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_NAME = re.compile(r"^(\d{14})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class MigrationReport:
    applied: list[str]
    already: list[str]
    #: objects that were missing although their migration was recorded (re-created)
    repaired: list[str] = field(default_factory=list)


_CREATES = re.compile(
    r"create\s+(?:or\s+replace\s+)?(function|table|view)\s+(?:if\s+not\s+exists\s+)?"
    r"(walsync(?:_api)?\.[a-z_][a-z0-9_]*)", re.IGNORECASE)


def _missing_objects(conn: psycopg.Connection[Any]) -> list[str]:
    """Tables, views and functions the migration files create that the database lacks."""
    missing = []
    for _, path in list_migrations():
        for kind, name in _CREATES.findall(path.read_text()):
            schema, _, obj = name.lower().partition(".")
            if kind.lower() == "function":
                row = conn.execute(
                    "select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace "
                    "where n.nspname = %s and p.proname = %s", (schema, obj)).fetchone()
            else:
                row = conn.execute("select to_regclass(%s)", (f"{schema}.{obj}",)).fetchone()
                row = row if row and row[0] is not None else None
            if row is None and name.lower() not in missing:
                missing.append(name.lower())
    return missing


def list_migrations() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        m = _NAME.match(path.name)
        if m:
            out.append((m.group(1), path))
    return out


def migrate(dsn: str) -> MigrationReport:
    """Apply every migration not yet applied; needs a role that may create schemas."""
    applied: list[str] = []
    already: list[str] = []
    try:
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
            recorded = conn.execute(
                "select to_regclass('walsync.schema_migrations') is not null").fetchone()
            repaired = _missing_objects(conn) if recorded and recorded[0] else []
            for version, path in list_migrations():
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
                    if row and not repaired:
                        already.append(path.name)
                        continue
                    conn.execute(path.read_bytes())
                    conn.execute(
                        "insert into walsync.schema_migrations (version, name) values (%s, %s)"
                        " on conflict (version) do nothing",
                        (version, path.name),
                    )
                    applied.append(path.name)
    except psycopg.Error as exc:
        raise classify(exc, f"migrating {redact_dsn(dsn)}") from None
    return MigrationReport(applied, already, repaired)
