"""Sync settings from the environment (or a config file), never the command line.

``WALSYNC_PG_DSN`` selects the ``postgres`` transport; ``SUPABASE_URL`` and
``SUPABASE_SERVICE_ROLE_KEY`` select ``supabase``. In tenant mode a worker uses
a tenant-scoped key instead: ``WALSYNC_SUPABASE_KEY`` (a JWT carrying the
tenant claim, sent as the bearer token) with ``SUPABASE_ANON_KEY`` as the
``apikey`` Supabase's gateway checks (the tenant key itself when unset); setting
both kinds of key is refused rather than guessed. ``WALSYNC_NODE_LABEL`` names this
host's node for `walsync nodes` (default: the host name; sync/nodes.py).
``WALSYNC_CONFIG`` may name
a file of ``NAME=value`` lines with the same names (mode 0600 recommended);
the environment wins over the file. Secrets stay out of shell history, logs,
errors and status output.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from walsync.engine.errors import SyncConfigError

from .scope import Scope
from .transport import Transport

__all__ = ["compact_every_seconds", "describe_target", "load_settings", "scope_from_settings",
           "transport_from_env"]

_NAMES = ("WALSYNC_PG_DSN", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "WALSYNC_TRANSPORT",
          "WALSYNC_SUPABASE_KEY", "SUPABASE_ANON_KEY", "WALSYNC_NODE_LABEL",
          "WALSYNC_SCOPE_PREFIXES", "WALSYNC_SCOPE_GROUP", "WALSYNC_COMPACT_EVERY")


def load_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if environ is None else environ)
    settings: dict[str, str] = {}
    path = env.get("WALSYNC_CONFIG")
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise SyncConfigError(f"cannot read WALSYNC_CONFIG file {path}: {exc.strerror}")\
                from None
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, value = line.partition("=")
            if not sep or name.strip() not in _NAMES:
                raise SyncConfigError(f"{path} line {n}: expected NAME=value with NAME one of "
                                      f"{', '.join(_NAMES)}")
            settings[name.strip()] = value.strip().strip('"').strip("'")
    settings.update({k: env[k] for k in _NAMES if env.get(k)})
    return settings


def transport_from_env(environ: Mapping[str, str] | None = None,
                       *, timeout_seconds: float = 30.0) -> Transport:
    s = load_settings(environ)
    choice = s.get("WALSYNC_TRANSPORT")
    if choice not in (None, "postgres", "supabase"):
        raise SyncConfigError(f"WALSYNC_TRANSPORT must be 'postgres' or 'supabase', not {choice!r}")
    if s.get("WALSYNC_PG_DSN") and choice != "supabase":
        from .postgres import PostgresTransport

        return PostgresTransport(s["WALSYNC_PG_DSN"], timeout_seconds=timeout_seconds)
    tenant_key = s.get("WALSYNC_SUPABASE_KEY")
    if s.get("SUPABASE_URL") and tenant_key and s.get("SUPABASE_SERVICE_ROLE_KEY"):
        # a tenant's worker must never fall back to the service role's all-tenant reach
        raise SyncConfigError("both SUPABASE_SERVICE_ROLE_KEY and WALSYNC_SUPABASE_KEY (a "
                              "tenant-scoped key) are set: set one")
    if s.get("SUPABASE_URL") and tenant_key:
        from .supabase import SupabaseTransport

        return SupabaseTransport(s["SUPABASE_URL"], s.get("SUPABASE_ANON_KEY") or tenant_key,
                                 access_token=tenant_key, timeout_seconds=timeout_seconds)
    if s.get("SUPABASE_URL") and s.get("SUPABASE_SERVICE_ROLE_KEY"):
        from .supabase import SupabaseTransport

        return SupabaseTransport(s["SUPABASE_URL"], s["SUPABASE_SERVICE_ROLE_KEY"],
                                 timeout_seconds=timeout_seconds)
    if s.get("SUPABASE_URL"):
        raise SyncConfigError("SUPABASE_URL is set but neither SUPABASE_SERVICE_ROLE_KEY nor "
                              "WALSYNC_SUPABASE_KEY is")
    raise SyncConfigError("no sync server configured: set WALSYNC_PG_DSN (a PostgreSQL DSN), "
                          "or SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY, in the environment "
                          "or in a WALSYNC_CONFIG file")


def describe_target(environ: Mapping[str, str] | None = None) -> str:
    """Where sync goes, without secrets."""
    s = load_settings(environ)
    if s.get("WALSYNC_PG_DSN") and s.get("WALSYNC_TRANSPORT") != "supabase":
        from .postgres import redact_dsn

        return redact_dsn(s["WALSYNC_PG_DSN"])
    return s.get("SUPABASE_URL", "<not configured>")


def scope_from_settings(environ: Mapping[str, str] | None = None) -> Scope | None:
    """The scope the settings name (sync/scope.py), or None when they name none:
    ``WALSYNC_SCOPE_PREFIXES`` (comma-separated; ``,`` alone: none, push only) and/or
    ``WALSYNC_SCOPE_GROUP``. ``walsync sync`` declares it on the store it syncs."""
    s = load_settings(environ)
    raw = s.get("WALSYNC_SCOPE_PREFIXES")
    group = s.get("WALSYNC_SCOPE_GROUP") or None
    if raw is None and group is None:
        return None
    prefixes = None if raw is None else tuple(p.strip() for p in raw.split(",") if p.strip())
    try:
        return Scope(prefixes=prefixes, group=group)
    except (TypeError, ValueError) as exc:
        raise SyncConfigError(f"WALSYNC_SCOPE_PREFIXES / WALSYNC_SCOPE_GROUP: {exc}") from None


def compact_every_seconds(environ: Mapping[str, str] | None = None) -> float | None:
    """``WALSYNC_COMPACT_EVERY``: seconds between the sync worker's log compactions
    (unset: none)."""
    raw = load_settings(environ).get("WALSYNC_COMPACT_EVERY")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise SyncConfigError(f"WALSYNC_COMPACT_EVERY must be a positive number of seconds, "
                              f"not {raw!r}")
    return seconds
