"""Apply the server schema: the numbered SQL files under sync/migrations/.

File names follow the Supabase CLI (``<UTC timestamp>_<name>.sql``), so the
same files can be copied into a Supabase project's ``supabase/migrations``.
Applying is idempotent: applied versions are recorded in
``walsync.schema_migrations``, each file runs in its own transaction, and a
transaction-scoped advisory lock keeps two migrators from racing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from .postgres import classify, redact_dsn

__all__ = ["MIGRATIONS_DIR", "MigrationReport", "list_migrations", "migrate"]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_NAME = re.compile(r"^(\d{14})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class MigrationReport:
    applied: list[str]
    already: list[str]


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
                    if row:
                        already.append(path.name)
                        continue
                    conn.execute(path.read_bytes())
                    conn.execute(
                        "insert into walsync.schema_migrations (version, name) values (%s, %s)",
                        (version, path.name),
                    )
                    applied.append(path.name)
    except psycopg.Error as exc:
        raise classify(exc, f"migrating {redact_dsn(dsn)}") from None
    return MigrationReport(applied, already)
