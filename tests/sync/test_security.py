"""Access control of the server schema: anon and authenticated see and change nothing.

Through the PostgREST-compatible gateway (as Supabase's API would be reached with the
anon key or a user's JWT), with a direct connection that switches to those roles, and by
reading the catalog: RLS on every table, SECURITY DEFINER functions with a pinned
search_path, executable by service_role alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest

from tests.gateway import PostgrestGateway
from tests.sync._helpers import entry, query, records, supabase_transport
from walsync.engine.errors import RemoteAuthError
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport

pytestmark = pytest.mark.postgres

API_ROLES = ("anon", "authenticated")


@pytest.fixture
def populated(pg_db: str) -> str:
    """A migrated database holding entries, siblings, a node and a conflict."""
    migrate(pg_db)
    t = PostgresTransport(pg_db)
    try:
        t.push("A", 10, records("A", 10, 2))
        t.push("B", 1, [entry("B", 1, "k/A/1/0", "concurrent")])
        t.lease_acquire("r1", "A", 60)
    finally:
        t.close()
    return pg_db


def snapshot(dsn: str) -> list[Any]:
    """Everything the server holds, to show that a refused request changed nothing."""
    return [query(dsn, f"select count(*) from walsync.{table}")[0][0]
            for table in ("nodes", "entries", "siblings", "leases", "fenced")] + [
        query(dsn, "select pos from walsync.head")[0][0],
        query(dsn, "select node_id, acked_lsn, pull_cursor from walsync.nodes order by 1")]


def api_functions(dsn: str) -> list[tuple[str, list[str]]]:
    """Each API function with its input arguments (a function returning a table names
    its columns among its arguments too, with mode 't': the gateway would not find it
    called with those)."""
    rows = query(dsn, "select p.proname, coalesce(p.proargnames, '{}'), p.proargmodes "
                      "from pg_proc p where p.pronamespace = 'walsync_api'::regnamespace "
                      "order by 1, 2")
    return [(str(name), [a for i, a in enumerate(args) if modes is None or modes[i] in "ib"])
            for name, args, modes in rows]


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def token_for(gateway: PostgrestGateway, role: str) -> str:
    if role == "anon":
        return gateway.anon_key
    return gateway.mint({"role": "authenticated", "sub": "user-1", "aud": "authenticated"})


def test_gateway_anon_and_authenticated_cannot_call_any_walsync_api_function(
        populated: str, pg_gateway: Callable[..., PostgrestGateway],
        http: httpx.Client) -> None:
    gateway = pg_gateway(schemas=["walsync_api"])
    before = snapshot(populated)
    functions = api_functions(populated)
    assert {"push", "pull", "node_status", "head", "conflicts", "lease_acquire",
            "state_page"} <= {name for name, _ in functions}
    for role in API_ROLES:
        key = token_for(gateway, role)
        for name, args in functions:
            body = {a: None for a in args}
            if name == "push":
                body = {"p_node": "evil", "p_through_lsn": 99,
                        "p_entries": [entry("evil", 1, "k/A/1/0", "pwned", {"evil": 1, "A": 99})]}
            elif name == "lease_acquire":
                body = {"p_run_id": "r1", "p_holder": "evil", "p_ttl_seconds": 60}
            response = http.post(f"{gateway.rest_url}/rpc/{name}", json=body,
                                  headers={"Content-Profile": "walsync_api", "apikey": key,
                                           "Authorization": f"Bearer {key}"})
            assert response.status_code == (401 if role == "anon" else 403), (
                role, name, response.status_code, response.text)
            assert response.json()["code"] == "42501", (role, name, response.text)
        # supabase-py with that key is refused the same way
        client = supabase_transport(gateway, key)
        try:
            with pytest.raises(RemoteAuthError, match="permission denied"):
                client.head()
        finally:
            client.close()
    # no header at all: PostgREST's anonymous role
    response = http.post(f"{gateway.rest_url}/rpc/head", json={},
                          headers={"Content-Profile": "walsync_api"})
    assert (response.status_code, response.json()["code"]) == (401, "42501")
    assert snapshot(populated) == before
    # while service_role is served
    service = supabase_transport(gateway)
    try:
        assert service.head() == before[5]
    finally:
        service.close()


@pytest.mark.parametrize("schema", ["walsync", "walsync_api"])
def test_gateway_anon_and_authenticated_cannot_read_walsync_tables(
        populated: str, pg_gateway: Callable[..., PostgrestGateway], schema: str,
        http: httpx.Client) -> None:
    # Even a project that wrongly exposes schema walsync leaks nothing.
    gateway = pg_gateway(schemas=["walsync_api", "walsync"])
    for role in (*API_ROLES, "service_role"):
        key = gateway.service_role_key if role == "service_role" else token_for(gateway, role)
        for table in ("siblings", "entries", "nodes", "state", "state_json", "conflicts",
                      "leases", "head"):
            response = http.get(f"{gateway.rest_url}/{table}", params={"select": "*"},
                                headers={"Accept-Profile": schema, "apikey": key,
                                                      "Authorization": f"Bearer {key}"})
            if schema == "walsync_api":  # the API schema holds functions only
                assert (response.status_code, response.json()["code"]) == (404, "PGRST205")
                continue
            # no privilege on schema walsync at all (service_role uses the functions)
            want = 401 if role == "anon" else 403
            assert (response.status_code, response.json()["code"]) == (want, "42501"), (
                role, table, response.text)
            assert "k/A" not in response.text


def test_gateway_unexposed_walsync_schema_is_refused(
        populated: str, pg_gateway: Callable[..., PostgrestGateway], http: httpx.Client) -> None:
    gateway = pg_gateway(schemas=["walsync_api"])
    key = gateway.anon_key
    response = http.get(f"{gateway.rest_url}/siblings", params={"select": "*"},
                         headers={"Accept-Profile": "walsync", "apikey": key,
                                  "Authorization": f"Bearer {key}"})
    assert (response.status_code, response.json()["code"]) == (406, "PGRST106")


def walsync_relations(dsn: str) -> list[tuple[str, str]]:
    return [(str(n), str(k)) for n, k in query(
        dsn, "select relname, relkind from pg_class "
             "where relnamespace = 'walsync'::regnamespace and relkind in ('r','p','v','m') "
             "order by 1")]


@pytest.mark.parametrize("role", API_ROLES)
def test_direct_connection_as_api_role_cannot_touch_walsync(populated: str, role: str) -> None:
    relations = walsync_relations(populated)
    assert {"nodes", "head", "entries", "siblings", "leases", "fenced", "schema_migrations",
            "state", "state_json", "conflicts"} <= {name for name, _ in relations}
    before = snapshot(populated)
    with psycopg.connect(populated, autocommit=True) as conn:
        conn.execute(f"set role {role}")
        for name, _kind in relations:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"select * from walsync.{name}")
        for stmt in ("insert into walsync.nodes (node_id) values ('evil')",
                     "update walsync.head set pos = 0",
                     "delete from walsync.siblings",
                     "select walsync_api.head()",
                     "select walsync_api.push('evil', 1, '[]'::jsonb)",
                     "select walsync_api.state_page('', null, 10)",
                     "select walsync.vv_leq('{}'::jsonb, '{}'::jsonb)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(stmt)
    assert snapshot(populated) == before


@pytest.mark.parametrize("role", API_ROLES)
def test_rls_hides_every_row_even_if_privileges_are_granted_by_mistake(
        populated: str, role: str) -> None:
    """Row Level Security has no policy for the API roles: a stray GRANT still shows nothing."""
    tables = [name for name, kind in walsync_relations(populated) if kind in ("r", "p")]
    with psycopg.connect(populated) as conn:  # one transaction, rolled back
        conn.execute(f"grant usage on schema walsync to {role}")
        for table in tables:
            conn.execute(f"grant select, insert, update, delete on walsync.{table} to {role}")
        conn.execute(f"set local role {role}")
        for table in tables:
            assert conn.execute(f"select count(*) from walsync.{table}").fetchone() == (0,), table
        assert conn.execute("update walsync.siblings set data = null").rowcount == 0
        assert conn.execute("delete from walsync.entries").rowcount == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute("insert into walsync.nodes (node_id) values ('evil')")
        conn.rollback()
    assert query(populated, "select count(*) from walsync.entries")[0][0] == 21


def test_row_level_security_is_on_for_every_walsync_table(populated: str) -> None:
    rows = query(populated, "select relname, relrowsecurity from pg_class "
                            "where relnamespace = 'walsync'::regnamespace "
                            "and relkind in ('r', 'p') order by 1")
    assert {name for name, _ in rows} >= {"nodes", "head", "entries", "siblings", "leases",
                                          "fenced", "schema_migrations"}
    assert [name for name, on in rows if not on] == []


def test_walsync_api_functions_are_security_definer_pinned_and_service_role_only(
        populated: str) -> None:
    rows = query(populated, """
        select p.proname, p.oid::regprocedure::text, p.prosecdef, p.proconfig,
               p.proacl is not null,
               exists (select 1 from aclexplode(coalesce(p.proacl, acldefault('f', p.proowner)))
                       where grantee = 0 and privilege_type = 'EXECUTE'),
               has_function_privilege('anon', p.oid, 'EXECUTE'),
               has_function_privilege('authenticated', p.oid, 'EXECUTE'),
               has_function_privilege('service_role', p.oid, 'EXECUTE')
        from pg_proc p where p.pronamespace = 'walsync_api'::regnamespace order by 1""")
    assert len(rows) >= 11
    for _name, sig, secdef, config, has_acl, public, anon, authed, service in rows:
        assert secdef, f"{sig} is not SECURITY DEFINER"
        paths = [c for c in (config or []) if c.startswith("search_path=")]
        assert paths, f"{sig} does not pin search_path"
        schemas = [s.strip().strip('"') for s in paths[0].split("=", 1)[1].split(",")]
        assert "public" not in schemas, (sig, schemas)
        assert "$user" not in schemas, (sig, schemas)
        assert schemas[0] == "pg_catalog", (sig, schemas)  # built-ins cannot be shadowed
        assert has_acl, f"{sig} has the default ACL: executable by PUBLIC"
        assert not public, f"{sig} is executable by PUBLIC"
        assert not anon, f"{sig} is executable by anon"
        assert not authed, f"{sig} is executable by authenticated"
        assert service, f"{sig} is not executable by service_role"
    # and the private schema's helpers are not callable by the API roles either
    for role in API_ROLES:
        assert query(populated, "select bool_or(has_function_privilege(%s, p.oid, 'EXECUTE')) "
                                "from pg_proc p where p.pronamespace = 'walsync'::regnamespace",
                     (role,)) == [(False,)]
        assert query(populated, "select has_schema_privilege(%s, 'walsync', 'USAGE'), "
                                "has_schema_privilege(%s, 'walsync_api', 'USAGE')",
                     (role, role)) == [(False, False)]
