"""Tenant mode (sync/migrations/tenant/): rows scoped by a JWT claim.

Through the PostgREST-compatible gateway with tenant-scoped keys (role authenticated plus
the ``tenant_id`` claim), as supabase-py sends them: a tenant reads and writes only its own
rows through every RPC function, its keys, node ids and run ids may equal another
tenant's without touching them, a key without the claim and anon get nothing, and the
service role still reaches every tenant. Underneath, Row Level Security confines both
``authenticated`` and the tenant-mode functions' owner, so a stray GRANT or a function
that forgets its filter still leaks nothing. ``walsync migrate --tenant-mode`` is
idempotent, plain ``migrate`` neither turns it on nor undoes it, and the default
contract (both transports, the replicator) still holds on a tenant-mode server.
"""

from __future__ import annotations

import json
import re
import time
import tomllib
from collections.abc import Callable, Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from click.testing import CliRunner

from tests.gateway import PostgrestGateway
from tests.sync._helpers import assert_secret_absent, entry, query, records, wait_for
from walsync.engine import Store
from walsync.engine.errors import RemoteAuthError, SyncConfigError
from walsync.sync.cli import main
from walsync.sync.config import transport_from_env
from walsync.sync.migrate import MIGRATIONS_DIR, list_migrations, migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.supabase import SupabaseTransport
from walsync.sync.transport import Conflict, FencedRun, LeaseRenewal, StateCount, Transport

pytestmark = pytest.mark.postgres

TENANT_FILES = [path.name for _, path in list_migrations(tenant=True)]
DEFAULT_FILES = [path.name for _, path in list_migrations()]
TABLES = ("nodes", "head", "entries", "siblings", "leases", "fenced", "key_locks",
          "scope_groups", "log_settings", "collected")
#: every walsync_api function a tenant-scoped key may call
TENANT_FUNCTIONS = {"push", "pull", "node_status", "head", "conflicts", "lease_acquire",
                    "lease_renew", "lease_release", "leases", "state_page", "state_count",
                    "hello", "push_claimed", "node_entries", "nodes", "node_label",
                    "log_window", "log_page", "entry_point", "pull_rows", "pull_scoped",
                    "scope_group", "scope_backfill", "log_retention", "compact_log"}
FAST = ReplicatorOptions(pull_interval_seconds=0.05, batch_wait_seconds=0.001,
                         retry_initial_seconds=0.02, retry_max_seconds=0.3)


def tenant_key(gateway: PostgrestGateway, tenant: str, claim: str = "tenant_id") -> str:
    return gateway.mint({"role": "authenticated", "aud": "authenticated",
                         "sub": f"worker-{tenant}", claim: tenant})


class Server:
    """A tenant-mode database, its gateway, and transports that are closed at the end."""

    def __init__(self, dsn: str, gateway: PostgrestGateway) -> None:
        self.dsn = dsn
        self.gateway = gateway
        self.opened: list[Transport] = []

    def _keep(self, t: Transport) -> Transport:
        self.opened.append(t)
        return t

    def tenant(self, tenant: str) -> Transport:
        """supabase-py as a tenant's worker: the anon key as apikey, the tenant JWT as bearer."""
        return self._keep(SupabaseTransport(self.gateway.url, self.gateway.anon_key,
                                            access_token=tenant_key(self.gateway, tenant),
                                            timeout_seconds=10))

    def key(self, key: str) -> Transport:
        return self._keep(SupabaseTransport(self.gateway.url, key, timeout_seconds=10))

    def service(self) -> Transport:
        return self.key(self.gateway.service_role_key)

    def direct(self) -> Transport:
        return self._keep(PostgresTransport(self.dsn, timeout_seconds=10))

    def close(self) -> None:
        for t in self.opened:
            t.close()


@pytest.fixture
def server(pg_db: str, pg_gateway: Callable[..., PostgrestGateway]) -> Iterator[Server]:
    report = migrate(pg_db, tenant_mode=True)
    assert report.applied == [*DEFAULT_FILES, *TENANT_FILES]
    assert report.tenant_claim == "tenant_id"
    s = Server(pg_db, pg_gateway(schemas=["walsync_api"]))
    try:
        yield s
    finally:
        s.close()


def populate(server: Server) -> tuple[Transport, Transport]:
    """Tenants A and B using the same node ids, keys and run id, with different values."""
    a, b = server.tenant("A"), server.tenant("B")
    a.push("n1", 3, records("n1", 3, 2))
    a.push("n2", 1, [entry("n2", 1, "k/n1/1/0", "A concurrent")])  # a conflict in A
    assert a.lease_acquire("r1", "n1", 600).token == 1
    b.push("n1", 1, [entry("n1", 1, "b/only", "B's")])
    return a, b


def visible(t: Transport) -> dict[str, Any]:
    """Everything one caller can read through the API (its pull records a "reader" node)."""
    n1 = t.node_status("n1")
    return {
        "pulled": sorted((e["origin"], e["lsn"], e["key"])
                         for e in t.pull("reader", 0, 10_000).entries),
        "head": t.head(),
        "state": sorted((r.key, r.sibling.version.origin, r.sibling.version.lsn)
                        for r in t.state_page("", None, 1000).rows),
        "count": t.state_count(""),
        "conflicts": t.conflicts("", 100),
        "leases": [(x.run_id, x.holder, x.token) for x in t.leases()],
        "n1": (n1.acked_lsn, n1.pull_cursor),
    }


def snapshot(dsn: str) -> list[Any]:
    return [query(dsn, f"select tenant, count(*) from walsync.{t} group by 1 order by 1")
            for t in TABLES] + [
        query(dsn, "select tenant, pos from walsync.head order by 1"),
        query(dsn, "select tenant, run_id, holder, token, expires_at from walsync.leases "
                   "order by 1, 2")]


# -- isolation through the API -----------------------------------------------------------


def test_tenant_reads_only_its_own_rows_through_every_read_function(server: Server) -> None:
    a, b = populate(server)
    seen_a, seen_b = visible(a), visible(b)
    own_keys = {e["key"] for e in records("n1", 3, 2)}
    assert {k for k, _, _ in seen_a["state"]} == own_keys
    assert seen_a["pulled"] == sorted(
        [("n1", e["lsn"], e["key"]) for e in records("n1", 3, 2)] + [("n2", 1, "k/n1/1/0")])
    assert (seen_a["head"], seen_a["count"].keys) == (7, 6)
    assert seen_a["conflicts"] == [Conflict("k/n1/1/0", 2)]
    assert seen_a["leases"] == [("r1", "n1", 1)]
    assert seen_a["n1"] == (3, 0)
    # B: its one row, positions counted from its own 1, none of A's rows, leases or nodes
    assert seen_b == {"pulled": [("n1", 1, "b/only")], "head": 1,
                      "state": [("b/only", "n1", 1)],
                      "count": StateCount(1, seen_b["count"].bytes),
                      "conflicts": [], "leases": [], "n1": (1, 0)}
    # a tenant that never wrote sees an empty server, and its pull cursor stays put
    c = server.tenant("C")
    assert visible(c) == {"pulled": [], "head": 0, "state": [],
                          "count": StateCount(0, 0), "conflicts": [], "leases": [],
                          "n1": (0, 0)}
    assert c.pull("reader", 0, 100).next == 0


def test_tenant_writes_land_in_its_own_namespace_only(server: Server) -> None:
    a, b = populate(server)
    before_a = visible(a)
    # B re-sends A's exact entry identities (same node, LSN, key) with its own values and
    # a vector that would dominate A's: new rows for B, nothing of A's replaced
    forged = [entry("n1", lsn, f"k/n1/{lsn}/0", "B overwrote", {"n1": 99, "n2": 99})
              for lsn in (1, 2, 3)]
    ack = b.push("n1", 99, forged)
    assert (ack.inserted, ack.merged, ack.acked_lsn) == (3, 3, 99)
    assert visible(a) == before_a
    assert b.node_status("n1").acked_lsn == 99
    assert a.node_status("n1").acked_lsn == 3
    assert query(server.dsn, "select tenant, count(*) from walsync.siblings "
                             "where key = 'k/n1/1/0' group by 1 order by 1") == [("A", 2), ("B", 1)]
    # the JSON form of push is scoped the same way
    b.call("push", {"p_node": "n9", "p_through_lsn": 1,
                    "p_entries": [entry("n9", 1, "k/n1/2/0", "B again", {"n9": 1, "n1": 99})]})
    assert visible(a) == before_a
    assert query(server.dsn, "select tenant from walsync.entries where origin = 'n9'") == [("B",)]


def test_tenant_cannot_take_renew_release_or_be_fenced_by_another_tenants_lease(
        server: Server) -> None:
    a, b = populate(server)
    lease_a = query(server.dsn, "select holder, token, expires_at from walsync.leases "
                                "where tenant = 'A'")
    # B's calls with A's holder and token find no lease of B's: nothing of A's changes
    assert b.lease_renew("r1", "n1", 1, 600) == LeaseRenewal(False, None, None, None)
    assert b.lease_release("r1", "n1", 1) is False
    # an unfenced write to run r1 is B's own business; A's lease refuses A's
    assert b.push("n1", 5, [entry("n1", 5, "runs/r1", "B's run")]).fenced == []
    refused = a.push("n7", 1, [entry("n7", 1, "runs/r1", "stale A write")])
    assert (refused.inserted, refused.fenced) == (0, [FencedRun("r1", 1, "n1")])
    # taking "r1" gives B its own lease, token 1: A's lease is untouched
    taken = b.lease_acquire("r1", "b-host", 600)
    assert (taken.acquired, taken.holder, taken.token) == (True, "b-host", 1)
    assert query(server.dsn, "select holder, token, expires_at from walsync.leases "
                             "where tenant = 'A'") == lease_a
    assert a.lease_acquire("r1", "other-a-host", 600).acquired is False
    assert a.lease_renew("r1", "n1", 1, 600).renewed is True
    assert b.leases()[0].holder == "b-host"
    assert a.leases()[0].holder == "n1"
    assert query(server.dsn, "select tenant, run_id from walsync.fenced") == [("A", "r1")]


def api_functions(dsn: str) -> list[tuple[str, list[str]]]:
    """Each API function with its input arguments (a function returning a table names
    its columns among its arguments too, with mode 't')."""
    rows = query(dsn, "select p.proname, coalesce(p.proargnames, '{}'), p.proargmodes "
                      "from pg_proc p where p.pronamespace = 'walsync_api'::regnamespace "
                      "order by 1, 2")
    return [(str(name), [a for i, a in enumerate(args) if modes is None or modes[i] in "ib"])
            for name, args, modes in rows]


def test_anon_and_keys_without_the_tenant_claim_get_nothing(server: Server) -> None:
    populate(server)
    before = snapshot(server.dsn)
    gw = server.gateway
    keys = {
        "anon": gw.anon_key,
        "no claim": gw.mint({"role": "authenticated", "sub": "user-1"}),
        "empty claim": gw.mint({"role": "authenticated", "tenant_id": ""}),
        "numeric claim": gw.mint({"role": "authenticated", "tenant_id": 7}),
        "other claim": gw.mint({"role": "authenticated", "tenant": "A"}),
    }
    functions = api_functions(server.dsn)
    assert {name for name, _ in functions} == TENANT_FUNCTIONS | {"tenants"}
    with httpx.Client(timeout=10) as http:
        for label, key in keys.items():
            for name, args in functions:
                body: dict[str, Any] = dict.fromkeys(args)
                if name == "push" and "p_entries" in args:
                    body = {"p_node": "evil", "p_through_lsn": 9,
                            "p_entries": [entry("evil", 1, "k/n1/1/0", "pwned", {"evil": 1})]}
                elif name == "lease_acquire":
                    body = {"p_run_id": "r1", "p_holder": "evil", "p_ttl_seconds": 60}
                response = http.post(f"{gw.rest_url}/rpc/{name}", json=body,
                                     headers={"Content-Profile": "walsync_api", "apikey": key,
                                              "Authorization": f"Bearer {key}"})
                want = 401 if label == "anon" else 403
                assert response.status_code == want, (label, name, response.text)
                assert response.json()["code"] == "42501", (label, name, response.text)
                if label != "anon" and name != "tenants":
                    # refused by tenant mode itself, with the claim it needs named
                    assert '"tenant_id" claim' in response.json()["message"], response.text
        response = http.post(f"{gw.rest_url}/rpc/head", json={},
                             headers={"Content-Profile": "walsync_api"})
        assert (response.status_code, response.json()["code"]) == (401, "42501")
    claimless = server.key(gw.anon_key)
    with pytest.raises(RemoteAuthError, match="permission denied") as caught:
        claimless.head()
    assert_secret_absent(caught.value, gw.anon_key)
    no_claim = SupabaseTransport(gw.url, gw.anon_key, access_token=keys["no claim"])
    try:
        with pytest.raises(RemoteAuthError, match='"tenant_id" claim') as caught:
            no_claim.push("evil", 1, [entry("evil", 1, "x", 1)])
        assert_secret_absent(caught.value, keys["no claim"], gw.anon_key)
    finally:
        no_claim.close()
    assert snapshot(server.dsn) == before


def test_service_role_reaches_every_tenant(server: Server) -> None:
    a, _ = populate(server)
    service = server.service()
    # without a tenant claim: the default tenant '' (the rows held before tenant mode)
    assert service.head() == 0
    service.push("ops", 1, [entry("ops", 1, "k/n1/1/0", "default tenant")])
    assert server.direct().head() == 1  # a direct connection is the same default tenant
    assert "ops" not in {o for o, _, _ in visible(a)["pulled"]}
    # it lists every tenant, and acts as one when its JWT carries the claim
    assert service.call("tenants", {}) == [
        {"tenant": "", "head": 1, "nodes": 1, "keys": 1},
        {"tenant": "A", "head": 7, "nodes": 3, "keys": 6},  # n1, n2, reader
        {"tenant": "B", "head": 1, "nodes": 1, "keys": 1}]
    as_a = server.key(server.gateway.mint({"role": "service_role", "tenant_id": "A"}))
    assert visible(as_a) == visible(a)
    # tenants() is the service role's alone
    with pytest.raises(RemoteAuthError, match="permission denied"):
        a.call("tenants", {})
    # the table editor's views rank each tenant's siblings apart
    assert query(server.dsn, "select tenant, value from walsync.tenant_state_json "
                             "where key = 'k/n1/1/0' order by 1") == [
        ("", "default tenant"), ("A", "A concurrent")]  # A's winner: origin n2 > n1
    assert sorted(query(server.dsn, "select origin from walsync.state "
                                    "where key = 'k/n1/1/0'")) == [("n2",), ("ops",)]


# -- the layers underneath ---------------------------------------------------------------


def counts_by_tenant(dsn: str) -> dict[str, dict[str, int]]:
    return {t: {str(k): int(n) for k, n in query(
        dsn, f"select tenant, count(*) from walsync.{t} group by 1")} for t in TABLES}


def test_rls_confines_authenticated_even_with_stray_grants(server: Server) -> None:
    populate(server)
    counts = counts_by_tenant(server.dsn)
    assert all(counts[t].get("B") for t in ("nodes", "head", "entries", "siblings"))
    with psycopg.connect(server.dsn) as conn:  # one transaction, rolled back
        conn.execute("grant usage on schema walsync to authenticated")
        for table in TABLES:
            conn.execute(f"grant select, insert, update, delete on walsync.{table} "
                         "to authenticated")
        conn.execute("set local role authenticated")
        conn.execute("select set_config('request.jwt.claims', %s, true)",
                     (json.dumps({"role": "authenticated", "tenant_id": "A"}),))
        for table in TABLES:
            rows = conn.execute(f"select tenant, count(*) from walsync.{table} "
                                "group by 1").fetchall()
            assert rows == ([("A", counts[table]["A"])] if counts[table].get("A") else []), table
        assert conn.execute("update walsync.siblings set data = null "
                            "where tenant = 'B'").rowcount == 0
        assert conn.execute("delete from walsync.entries where tenant <> 'A'").rowcount == 0
        # a row written without a tenant gets the claim's; naming another tenant is refused
        assert conn.execute("insert into walsync.nodes (node_id) values ('direct') "
                            "returning tenant").fetchone() == ("A",)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute("insert into walsync.nodes (tenant, node_id) values ('B', 'evil')")
        conn.rollback()
    with psycopg.connect(server.dsn) as conn:
        conn.execute("grant usage on schema walsync to authenticated")
        conn.execute("grant select on walsync.siblings to authenticated")
        conn.execute("set local role authenticated")
        conn.execute("select set_config('request.jwt.claims', %s, true)",
                     (json.dumps({"role": "authenticated"}),))
        assert conn.execute("select count(*) from walsync.siblings").fetchone() == (0,)
        conn.rollback()
    assert counts_by_tenant(server.dsn) == counts


def test_rls_confines_a_tenant_function_that_forgets_its_filter(server: Server) -> None:
    """The second layer: a tenant-mode function with no tenant filter at all still sees
    only its caller's rows, because its owner is subject to Row Level Security."""
    populate(server)
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute("""
            create function walsync_api.unfiltered() returns jsonb
            language sql security definer set search_path = pg_catalog, walsync as $$
              with u as (update walsync.leases set holder = 'thief' returning tenant)
              select jsonb_build_object(
                'entries', (select count(*) from walsync.entries),
                'tenants', (select jsonb_agg(distinct tenant) from walsync.siblings),
                'updated', (select jsonb_agg(tenant) from u))
            $$""")
        conn.execute("alter function walsync_api.unfiltered() owner to walsync_tenant_api")
        conn.execute("grant execute on function walsync_api.unfiltered() to authenticated")
    assert server.tenant("B").call("unfiltered", {}) == {
        "entries": 1, "tenants": ["B"], "updated": None}
    assert server.tenant("A").call("unfiltered", {}) == {
        "entries": 7, "tenants": ["A"], "updated": ["A"]}
    assert query(server.dsn, "select tenant, holder from walsync.leases") == [("A", "thief")]


def test_tenant_mode_catalog_every_function_scoped_owned_and_granted(server: Server) -> None:
    rows = query(server.dsn, """
        select p.proname, p.oid::regprocedure::text, p.prosecdef, p.proconfig,
               pg_get_userbyid(p.proowner),
               has_function_privilege('anon', p.oid, 'EXECUTE'),
               has_function_privilege('authenticated', p.oid, 'EXECUTE'),
               has_function_privilege('service_role', p.oid, 'EXECUTE'),
               exists (select 1 from aclexplode(coalesce(p.proacl, acldefault('f', p.proowner)))
                       where grantee = 0 and privilege_type = 'EXECUTE')
        from pg_proc p where p.pronamespace = 'walsync_api'::regnamespace order by 2""")
    # every function the default files define is open to tenants, except tenants() (a new
    # API function is the service role's until the tenant file names it)
    assert {name for name, *_ in rows} == TENANT_FUNCTIONS | {"tenants"}
    for name, sig, secdef, config, owner, anon, authed, service, public in rows:
        assert secdef, sig
        assert [c for c in config or [] if c.startswith("search_path=")] == [
            "search_path=pg_catalog, walsync"], sig
        assert (anon, public, service) == (False, False, True), sig
        if name == "tenants":
            assert (owner, authed) == ("postgres", False), sig
        else:
            assert (owner, authed) == ("walsync_tenant_api", True), sig
    assert query(server.dsn, "select rolsuper, rolbypassrls, rolcanlogin from pg_roles "
                             "where rolname = 'walsync_tenant_api'") == [(False, False, False)]
    tables = query(server.dsn, """
        select c.relname, c.relrowsecurity, pg_get_userbyid(c.relowner),
               (select array_agg(pol.polname || ':' || pol.polcmd::text
                                 || ':' || array_to_string(array(select rolname from pg_roles
                                                                where oid = any(pol.polroles)
                                                                order by 1), ','))
                from pg_policy pol where pol.polrelid = c.oid)
        from pg_class c
        where c.relnamespace = 'walsync'::regnamespace and c.relkind = 'r' order by 1""")
    for table, rls, owner, policies in tables:
        assert rls, table
        assert owner == "postgres", table
        want = ["walsync_tenant:*:authenticated,walsync_tenant_api"] if table in TABLES \
            else None
        if table == "server":  # one row, the database's id: no tenant's
            want = ["walsync_server_read:r:walsync_tenant_api"]
        assert policies == want, table
    # two tenants may share node ids, keys, run ids and positions
    keys = dict(query(server.dsn, """
        select c.relname, pg_get_indexdef(i.indexrelid) from pg_index i
        join pg_class c on c.oid = i.indrelid
        where c.relnamespace = 'walsync'::regnamespace and i.indisunique
          and c.relname = any(%s)""", (list(TABLES),)))
    assert all("(tenant" in keys[t] for t in TABLES), keys
    assert query(server.dsn, "select count(*) from pg_index i join pg_class c "
                             "on c.oid = i.indrelid where c.relname = any(%s) "
                             "and c.relnamespace = 'walsync'::regnamespace and i.indisunique "
                             "and pg_get_indexdef(i.indexrelid) not like '%%(tenant%%'",
                 (list(TABLES),)) == [(0,)]


# -- migrate -----------------------------------------------------------------------------


def fingerprint(dsn: str) -> list[Any]:
    """Every definition, owner and privilege tenant mode sets (a no-op run changes none)."""
    return query(dsn, """
        select 'f', p.oid::regprocedure::text,
               md5(pg_get_functiondef(p.oid)) || pg_get_userbyid(p.proowner)
               || coalesce(p.proacl::text, '')
        from pg_proc p where p.pronamespace in ('walsync'::regnamespace,
                                                'walsync_api'::regnamespace)
        union all
        select 'p', pol.polrelid::regclass::text || '.' || pol.polname,
               pg_get_expr(pol.polqual, pol.polrelid)
        from pg_policy pol join pg_class c on c.oid = pol.polrelid
        where c.relnamespace = 'walsync'::regnamespace
        union all
        select 'i', indexrelid::regclass::text, pg_get_indexdef(indexrelid)
        from pg_index i join pg_class c on c.oid = i.indrelid
        where c.relnamespace = 'walsync'::regnamespace
        union all
        select 'v', c.oid::regclass::text, pg_get_viewdef(c.oid)
        from pg_class c where c.relnamespace = 'walsync'::regnamespace and c.relkind = 'v'
        order by 1, 2""")


def run_cli(dsn: str, *args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(main, ["migrate", *args], env={"WALSYNC_PG_DSN": dsn},
                                catch_exceptions=False)
    assert result.exit_code == code, (args, result.output, result.stderr)
    return result


def test_migrate_tenant_mode_is_opt_in_idempotent_and_stays_on(pg_db: str) -> None:
    plain = json.loads(run_cli(pg_db, "--json").stdout)
    assert (plain["applied"], plain["tenant_claim"]) == (DEFAULT_FILES, None)
    # plain migrate turns nothing of tenant mode on: no setting, no policy, no grant to
    # authenticated, and every caller is the one tenant '' whatever its JWT says
    assert query(pg_db, "select (select count(*) from walsync.tenant_settings), "
                        "(select count(*) from pg_policy pol join pg_class c "
                        " on c.oid = pol.polrelid "
                        " where c.relnamespace = 'walsync'::regnamespace), "
                        "(select count(*) from pg_proc p "
                        " where p.pronamespace = 'walsync_api'::regnamespace "
                        " and has_function_privilege('authenticated', p.oid, 'EXECUTE')), "
                        "(select count(*) from pg_proc p "
                        " where p.pronamespace = 'walsync_api'::regnamespace "
                        " and pg_get_userbyid(p.proowner) <> current_user), "
                        "(select array_agg(distinct pg_get_expr(d.adbin, d.adrelid)) "
                        " from pg_attrdef d join pg_attribute a on a.attrelid = d.adrelid "
                        " and a.attnum = d.adnum where a.attname = 'tenant' "
                        " and d.adrelid = any(array['walsync.nodes', 'walsync.entries', "
                        " 'walsync.siblings']::regclass[]))") == [(0, 0, 0, 0, ["''::text"])]
    with psycopg.connect(pg_db) as conn:  # rolled back
        conn.execute("select set_config('request.jwt.claims', %s, true)",
                     (json.dumps({"tenant_id": "acme"}),))
        assert conn.execute("select walsync.request_tenant()").fetchone() == ("",)
        conn.rollback()
    untouched = fingerprint(pg_db)
    assert json.loads(run_cli(pg_db, "--json").stdout)["applied"] == []
    assert fingerprint(pg_db) == untouched

    refused = run_cli(pg_db, "--tenant-claim", "org_id", code=2)  # usage
    assert "tenant mode" in refused.stderr
    assert "not a JWT claim name" in run_cli(pg_db, "--tenant-mode", "--tenant-claim",
                                             "bad claim", code=2).stderr
    assert fingerprint(pg_db) == untouched  # both refused before touching the database

    first = json.loads(run_cli(pg_db, "--tenant-mode", "--tenant-claim", "org_id",
                               "--json").stdout)
    assert (first["applied"], first["tenant_claim"]) == (TENANT_FILES, "org_id")
    on = fingerprint(pg_db)
    assert on != untouched
    again = json.loads(run_cli(pg_db, "--tenant-mode", "--json").stdout)
    assert (again["applied"], again["already"], again["tenant_claim"]) == (
        [], [*DEFAULT_FILES, *TENANT_FILES], "org_id")  # a re-run keeps the chosen claim
    text = run_cli(pg_db).stdout
    assert "0 applied" in text
    assert "tenant mode on (JWT claim 'org_id')" in text
    assert fingerprint(pg_db) == on
    with psycopg.connect(pg_db) as conn:  # rolled back
        conn.execute("grant usage on schema walsync to authenticated")
        conn.execute("set local role authenticated")
        for claims, tenant in (({"org_id": "acme"}, "acme"), ({"tenant_id": "acme"}, None)):
            conn.execute("select set_config('request.jwt.claims', %s, true)",
                         (json.dumps(claims),))
            assert conn.execute("select walsync.request_tenant()").fetchone() == (tenant,)
        conn.rollback()
    with pytest.raises(SyncConfigError, match="needs tenant mode"):
        migrate(pg_db, tenant_claim="org_id")


def test_migrate_repair_reapplies_tenant_mode_after_the_default_files(server: Server) -> None:
    a, b = populate(server)
    scoped = fingerprint(server.dsn)
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute("drop function walsync_api.state_count(text)")
    report = migrate(server.dsn)  # plain: the repair the sync errors point to
    assert report.repaired == ["walsync_api.state_count"]
    assert report.applied == [*DEFAULT_FILES, *TENANT_FILES]
    assert report.tenant_claim == "tenant_id"
    assert fingerprint(server.dsn) == scoped
    assert b.state_count("").keys == 1
    assert a.state_count("").keys == 6
    assert visible(b)["pulled"] == [("n1", 1, "b/only")]
    # a default file applied later (an upgrade) is followed by the tenant file again
    query(server.dsn, "delete from walsync.schema_migrations where version = %s returning 1",
          (DEFAULT_FILES[-1][:14],))
    upgrade = migrate(server.dsn)
    assert (upgrade.applied, upgrade.repaired) == ([DEFAULT_FILES[-1], *TENANT_FILES], [])
    assert fingerprint(server.dsn) == scoped
    assert visible(b)["state"] == [("b/only", "n1", 1)]


def test_migration_files_are_plain_sql_named_for_the_supabase_cli_and_shipped() -> None:
    """Usable as-is with the Supabase CLI (no psql meta-commands, its file names), and
    installed with the package (a wheel without them would migrate nothing)."""
    root = MIGRATIONS_DIR.parent
    files = sorted(p.relative_to(root) for p in (root / "migrations").rglob("*.sql"))
    assert [p.as_posix() for p in files if p.parent.name == "tenant"] == [
        f"migrations/tenant/{name}" for name in TENANT_FILES]
    pyproject = tomllib.loads((root.parent / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["walsync.sync"]
    for rel in files:
        assert re.fullmatch(r"\d{14}_[a-z0-9_]+\.sql", rel.name), rel
        lines = (root / rel).read_text().splitlines()
        assert [n for n, line in enumerate(lines, 1) if line.lstrip().startswith("\\")] == [], rel
        assert any(fnmatch(rel.as_posix(), pattern) for pattern in shipped), (rel, shipped)


# -- the default contract on a tenant-mode server -----------------------------------------


def test_contract_flows_hold_for_the_default_tenant_and_for_a_tenant(server: Server) -> None:
    # the service role acts on the direct connection's default tenant: nothing new for it
    for t, inserted in ((server.direct(), 6), (server.tenant("A"), 6), (server.service(), 0)):
        batch = records("n1", 3, 2)
        ack = t.push("n1", 3, batch)
        assert (ack.acked_lsn, ack.inserted, ack.head) == (3, inserted, 6)
        again = t.push("n1", 3, batch)
        assert (again.acked_lsn, again.inserted, again.merged, again.head) == (3, 0, 0, 6)
        page = t.pull("n2", 0, 3)  # whole records: 2 keys each
        assert ([e["lsn"] for e in page.entries], page.next, page.head) == ([1, 1, 2, 2], 4, 6)
        rest = t.pull("n2", page.next, 100)
        assert ([e["lsn"] for e in rest.entries], rest.next) == ([3, 3], 6)
        assert t.pull("n1", 0, 100).entries == []
        assert (t.node_status("n1").acked_lsn, t.node_status("n2").pull_cursor) == (3, 4)
        assert t.head() == 6
    assert query(server.dsn, "select tenant, pos from walsync.head order by 1") == [
        ("", 6), ("A", 6)]


def test_replicator_between_two_stores_of_one_tenant_through_the_gateway(
        server: Server, tmp_path: Path) -> None:
    gw = server.gateway
    env = {"SUPABASE_URL": gw.url, "SUPABASE_ANON_KEY": gw.anon_key}
    stores: list[Store] = []
    reps: list[Replicator] = []

    def node(name: str, tenant: str) -> tuple[Store, Replicator]:
        store = Store.open(tmp_path / name, node_id=name)
        stores.append(store)
        transport = transport_from_env({**env, "WALSYNC_SUPABASE_KEY": tenant_key(gw, tenant)},
                                       timeout_seconds=10)
        rep = Replicator(store, transport, FAST).start()
        reps.append(rep)
        return store, rep

    try:
        a1, ra1 = node("a1", "A")
        a2, ra2 = node("a2", "A")
        b1, rb1 = node("b1", "B")
        a1.put("shared", {"from": "a1"})
        a1.put("runs/1", {"step": 3})
        b1.put("shared", {"from": "b1"})
        wait_for(lambda: a2.get("runs/1") == {"step": 3} and a2.get("shared") is not None,
                 what="a1 -> a2")
        a2.put("from-a2", 1)
        wait_for(lambda: a1.get("from-a2") == 1, what="a2 -> a1")
        everything_on_server = time.time()
        wait_for(lambda: all(r.error is None and r.status().lag_entries == 0
                             for r in (ra1, ra2, rb1))
                 and (rb1.status().last_pull_at or 0) > everything_on_server,
                 what="every replicator caught up, b1 pulled after A's writes")
        assert a2.get("shared") == a1.get("shared") == {"from": "a1"}
        assert dict(b1.scan()) == {"shared": {"from": "b1"}}
        assert query(server.dsn, "select tenant, count(*) from walsync.entries "
                                 "group by 1 order by 1") == [("A", 3), ("B", 1)]
    finally:
        for rep in reps:
            rep.close()
        for store in stores:
            store.close()


def test_config_tenant_key_selects_a_scoped_transport_and_never_both_keys(
        server: Server) -> None:
    gw = server.gateway
    key = tenant_key(gw, "A")
    t = transport_from_env({"SUPABASE_URL": gw.url, "WALSYNC_SUPABASE_KEY": key})
    try:
        t.push("n1", 1, [entry("n1", 1, "k", 1)])
    finally:
        t.close()
    assert query(server.dsn, "select tenant, key from walsync.entries") == [("A", "k")]
    with pytest.raises(SyncConfigError, match="set one") as caught:
        transport_from_env({"SUPABASE_URL": gw.url, "WALSYNC_SUPABASE_KEY": key,
                            "SUPABASE_SERVICE_ROLE_KEY": gw.service_role_key})
    assert_secret_absent(caught.value, key, gw.service_role_key)


def test_tenant_scope_groups_retention_and_compaction_are_each_tenants_own(
        server: Server) -> None:
    a, b = populate(server)
    a.scope_group("g", ["k/"])
    b.scope_group("g", ["b/"])
    assert [(g.name, g.prefixes) for g in a.scope_group(None)] == [("g", ("k/",))]
    assert [(g.name, g.prefixes) for g in b.scope_group(None)] == [("g", ("b/",))]
    assert {e["key"] for e in a.pull("reader", 0, 100, group="g").entries} == {
        "k/n1/1/0", "k/n1/1/1", "k/n1/2/0", "k/n1/2/1", "k/n1/3/0", "k/n1/3/1"}
    assert [e["key"] for e in b.pull("reader", 0, 100, group="g").entries] == ["b/only"]
    assert b.pull("reader", 0, 100, prefixes=["k/"]).entries == []
    a.log_retention(3600)
    assert b.log_retention().retention_seconds == 604800
    assert a.compact_log().ran is True
    assert b.log_retention().compacted_at is None
    assert [r.key for r in b.scope_backfill("x", "", 0, 100, [], None, 100).rows] == ["b/only"]
    assert query(server.dsn, "select tenant, name from walsync.scope_groups order by 1") == [
        ("A", "g"), ("B", "g")]
