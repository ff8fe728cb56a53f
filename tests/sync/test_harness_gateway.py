"""The PostgreSQL harness (tests/pg.py) and the PostgREST-compatible gateway (tests/gateway.py),
exercised with real PostgreSQL and a real supabase-py client."""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from postgrest import SyncPostgrestClient
from postgrest.exceptions import APIError
from supabase import Client, ClientOptions, create_client

from tests.gateway import TEST_JWT_SECRET, PostgrestGateway, mint_jwt
from tests.pg import PostgresCluster, PostgresNotFound

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[2]

API_SQL = """
CREATE SCHEMA walsync;  -- private: not exposed by the gateway
CREATE SCHEMA walsync_api;
GRANT USAGE ON SCHEMA walsync_api TO anon, authenticated, service_role;

CREATE FUNCTION walsync_api.echo(p_a int, p_b jsonb DEFAULT '{}')
RETURNS jsonb LANGUAGE sql SECURITY DEFINER SET search_path = '' AS $$
  SELECT jsonb_build_object(
    'a', p_a, 'b', p_b,
    'role', current_setting('request.jwt.claim.role', true),
    'tenant', current_setting('request.jwt.claims', true)::jsonb ->> 'tenant')
$$;

CREATE FUNCTION walsync_api.series(n int) RETURNS SETOF int
LANGUAGE sql SECURITY DEFINER SET search_path = '' AS $$ SELECT generate_series(1, n) $$;

CREATE FUNCTION walsync_api.squares(n int) RETURNS TABLE (i int, sq bigint)
LANGUAGE sql SECURITY DEFINER SET search_path = '' AS $$
  SELECT g, g::bigint * g FROM generate_series(1, n) AS g
$$;

CREATE FUNCTION walsync_api.fail_with(p_code text, p_hint text)
RETURNS jsonb LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
  RAISE EXCEPTION 'refused: %', p_code USING ERRCODE = p_code, HINT = p_hint,
    DETAIL = 'detail for ' || p_code;
END $$;

CREATE TABLE walsync.keys (k text PRIMARY KEY);
CREATE FUNCTION walsync_api.put_key(p_k text) RETURNS jsonb
LANGUAGE sql SECURITY DEFINER SET search_path = '' AS $$
  INSERT INTO walsync.keys VALUES (p_k) RETURNING jsonb_build_object('k', k)
$$;

DO $$
DECLARE f regprocedure;
BEGIN
  FOR f IN SELECT p.oid FROM pg_proc p
           WHERE p.pronamespace = 'walsync_api'::regnamespace LOOP
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC, anon, authenticated', f);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', f);
  END LOOP;
END $$;

-- public tables get Supabase's default grants; RLS without a policy hides every row
CREATE TABLE public.notes (id int PRIMARY KEY, body text);
INSERT INTO public.notes VALUES (1, 'secret');
ALTER TABLE public.notes ENABLE ROW LEVEL SECURITY;
CREATE TABLE public.ungranted (id int);
REVOKE ALL ON public.ungranted FROM anon, authenticated;
"""


@pytest.fixture
def api_db(pg_db: str) -> str:
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute(API_SQL)
    return pg_db


@pytest.fixture
def gateway(api_db: str, pg_gateway: Callable[..., PostgrestGateway]) -> PostgrestGateway:
    return pg_gateway(schemas=["walsync_api", "public"])


@contextlib.contextmanager
def supabase(gateway: PostgrestGateway, key: str, schema: str = "walsync_api") -> Iterator[Client]:
    # An explicit httpx client: without one supabase-py 2.34 passes its default timeout to
    # the postgrest client, which raises a DeprecationWarning (an error under our pytest).
    http = httpx.Client(timeout=10)
    try:
        yield create_client(gateway.url, key, options=ClientOptions(
            schema=schema, httpx_client=http, auto_refresh_token=False,
            persist_session=False))
    finally:
        http.close()


def rpc(client: Client | SyncPostgrestClient, fn: str, args: Mapping[str, object]) -> Any:
    params: Any = dict(args)  # postgrest-py types RPC params as dict[str, str]
    return client.rpc(fn, params).execute().data


def raw_rpc(gateway: PostgrestGateway, fn: str, args: Mapping[str, object],
            token: str | None, schema: str = "walsync_api") -> httpx.Response:
    headers = {"Content-Profile": schema, "apikey": token or ""}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(f"{gateway.rest_url}/rpc/{fn}", json=args, headers=headers, timeout=10)


def api_error(call: Callable[[], object]) -> APIError:
    with pytest.raises(APIError) as info:
        call()
    return info.value


# -- the cluster -----------------------------------------------------------------------------


def test_cluster_starts_and_answers(pg_cluster: PostgresCluster, pg_db: str) -> None:
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT 1 + 1").fetchone() == (2,)
        assert (conn.info.host, conn.info.port) == ("127.0.0.1", pg_cluster.port)
        roles = {name: tuple(attrs) for name, *attrs in conn.execute(
            "SELECT rolname, rolcanlogin, rolinherit, rolbypassrls FROM pg_roles "
            "WHERE rolname IN ('anon', 'authenticated', 'service_role', 'authenticator')")}
        assert roles == {"anon": (False, False, False), "authenticated": (False, False, False),
                         "service_role": (False, False, True),
                         "authenticator": (True, False, False)}
        members = {r for (r,) in conn.execute(
            "SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
            "WHERE m.member = 'authenticator'::regrole")}
        assert members == {"anon", "authenticated", "service_role"}
        assert conn.execute("SELECT current_setting('listen_addresses')").fetchone() == (
            "127.0.0.1",)
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                            ).fetchone() == (0,)  # a fresh database
    if os.geteuid() == 0:  # the server runs as postgres, never as root
        postgres_uid = pwd.getpwnam("postgres").pw_uid
        pid = int((pg_cluster.data_dir / "postmaster.pid").read_text().split()[0])
        status = Path(f"/proc/{pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(postgres_uid)] * 4
        assert pg_cluster.data_dir.stat().st_uid == postgres_uid


def test_restart_and_kill_keep_committed_data(pg_cluster: PostgresCluster, pg_db: str) -> None:
    port = pg_cluster.port
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
    pg_cluster.restart()
    assert pg_cluster.port == port
    with psycopg.connect(pg_db, autocommit=True) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]
        conn.execute("INSERT INTO t VALUES (2)")
        pg_cluster.kill()  # crash: no checkpoint; committed rows come back by WAL replay
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert not pg_cluster.running
    pg_cluster.start()
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT x FROM t ORDER BY x").fetchall() == [(1,), (2,)]


def test_missing_binaries_raise_with_install_hint(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALSYNC_PG_BINDIR", str(tmp_path))
    cluster = PostgresCluster()
    with pytest.raises(PostgresNotFound, match="apt-get install postgresql"):
        cluster.start()
    assert cluster.base_dir is None  # nothing was created


def test_missing_binaries_fail_the_fixture_never_skip(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(textwrap.dedent("""
        def test_needs_postgres(pg_db):
            pass
    """))
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "WALSYNC_PG_BINDIR": str(empty), "PYTHONPATH": str(REPO),
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # plugin autoload alone takes seconds
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "-q", "-rA", "test_inner.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 error" in out, out
    assert "skipped" not in out, out
    assert f"WALSYNC_PG_BINDIR={empty}" in out, out
    assert "apt-get install postgresql" in out, out


# -- the gateway with supabase-py ------------------------------------------------------------


def test_service_role_calls_rpc_through_supabase_py(gateway: PostgrestGateway) -> None:
    with supabase(gateway, gateway.service_role_key) as client:
        data = rpc(client, "echo", {"p_a": 7, "p_b": {"x": [1, "two"]}})
        assert data == {"a": 7, "b": {"x": [1, "two"]}, "role": "service_role", "tenant": None}
        assert rpc(client, "echo", {"p_a": 1})["b"] == {}  # default argument
    with supabase(gateway, gateway.service_role_key, schema="public") as client:
        assert rpc(client.schema("walsync_api"), "echo", {"p_a": 2})["a"] == 2


def test_claims_reach_sql(gateway: PostgrestGateway) -> None:
    key = gateway.mint({"role": "service_role", "tenant": "acme"})
    with supabase(gateway, key) as client:
        assert rpc(client, "echo", {"p_a": 1})["tenant"] == "acme"


def test_anon_and_authenticated_get_permission_errors(gateway: PostgrestGateway) -> None:
    with supabase(gateway, gateway.anon_key) as client:
        err = api_error(lambda: client.rpc("echo", {"p_a": 1}).execute())
    assert (err.code, err.message) == ("42501", "permission denied for function echo")
    assert raw_rpc(gateway, "echo", {"p_a": 1}, gateway.anon_key).status_code == 401
    assert raw_rpc(gateway, "echo", {"p_a": 1}, None).status_code == 401  # no JWT: anon
    user = gateway.mint({"role": "authenticated", "sub": "user-1"})
    response = raw_rpc(gateway, "echo", {"p_a": 1}, user)
    assert (response.status_code, response.json()["code"]) == (403, "42501")


@pytest.mark.parametrize(("token", "code"), [
    (mint_jwt({"role": "service_role"}, "x" * 40), "PGRST301"),  # wrong secret
    ("not-a-jwt", "PGRST301"),
    (mint_jwt({"role": "service_role"}, expires_in=-120), "PGRST303"),  # expired
], ids=["wrong-secret", "malformed", "expired"])
def test_bad_jwt_is_401(gateway: PostgrestGateway, token: str, code: str) -> None:
    with supabase(gateway, token) as client:
        err = api_error(lambda: client.rpc("echo", {"p_a": 1}).execute())
    assert err.code == code
    response = raw_rpc(gateway, "echo", {"p_a": 1}, token)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    assert response.headers["Proxy-Status"] == f"PostgREST; error={code}"


def test_role_from_jwt_must_exist(gateway: PostgrestGateway) -> None:
    response = raw_rpc(gateway, "echo", {"p_a": 1}, gateway.mint({"role": "nobody"}))
    assert response.status_code == 401
    assert response.json()["code"] == "22023"


@pytest.mark.parametrize(("sqlstate", "status"), [
    ("WS409", 400),  # any custom SQLSTATE: 400, code and hint passed through
    ("P0001", 400),
    ("PT409", 409),  # PostgREST's PTxxx: that HTTP status
    ("40001", 500),  # serialization failure: PostgREST maps class 40 to 500
    ("57014", 500),  # query_canceled (statement timeout)
    ("53300", 503),  # too_many_connections
])
def test_raised_sqlstate_and_hint_reach_the_client(gateway: PostgrestGateway, sqlstate: str,
                                                   status: int) -> None:
    args = {"p_code": sqlstate, "p_hint": "take the lease again"}
    with supabase(gateway, gateway.service_role_key) as client:
        err = api_error(lambda: rpc(client, "fail_with", args))
    assert (err.code, err.hint) == (sqlstate, "take the lease again")
    assert (err.message, err.details) == (f"refused: {sqlstate}", f"detail for {sqlstate}")
    assert raw_rpc(gateway, "fail_with", args, gateway.service_role_key).status_code == status


def test_unique_violation_is_409_and_rolls_back(gateway: PostgrestGateway) -> None:
    with supabase(gateway, gateway.service_role_key) as client:
        assert rpc(client, "put_key", {"p_k": "a"}) == {"k": "a"}
        err = api_error(lambda: client.rpc("put_key", {"p_k": "a"}).execute())
    assert err.code == "23505"
    assert raw_rpc(gateway, "put_key", {"p_k": "a"}, gateway.service_role_key
                   ).status_code == 409


def test_set_returning_functions_are_capped_at_max_rows(
        gateway: PostgrestGateway, pg_gateway: Callable[..., PostgrestGateway]) -> None:
    with supabase(gateway, gateway.service_role_key) as client:
        assert rpc(client, "series", {"n": 1500}) == list(range(1, 1001))
        assert rpc(client, "series", {"n": 3}) == [1, 2, 3]
        assert rpc(client, "squares", {"n": 2}) == [{"i": 1, "sq": 1},
                                                                  {"i": 2, "sq": 4}]
        assert rpc(client, "series", {"n": 0}) == []
    uncapped = pg_gateway(schemas=["walsync_api"], max_rows=None)
    with supabase(uncapped, uncapped.service_role_key) as client:
        assert len(rpc(client, "series", {"n": 1500})) == 1500


def test_unknown_function_and_unexposed_schema(gateway: PostgrestGateway) -> None:
    with supabase(gateway, gateway.service_role_key) as client:
        err = api_error(lambda: client.rpc("nope", {"a": 1}).execute())
        assert err.code == "PGRST202"
        assert err.message == "Could not find the function walsync_api.nope(a) in the schema cache"
        err = api_error(lambda: client.rpc("echo", {"p_wrong": 1}).execute())
        assert err.code == "PGRST202"
    with supabase(gateway, gateway.service_role_key, schema="walsync") as client:
        err = api_error(lambda: client.rpc("echo", {"p_a": 1}).execute())
    assert (err.code, err.message) == ("PGRST106", "Invalid schema: walsync")
    assert raw_rpc(gateway, "nope", {}, gateway.service_role_key).status_code == 404
    assert raw_rpc(gateway, "echo", {"p_a": 1}, gateway.service_role_key,
                   schema="walsync").status_code == 406


def test_anon_cannot_read_tables(gateway: PostgrestGateway) -> None:
    with supabase(gateway, gateway.anon_key, schema="public") as client:
        assert client.table("notes").select("*").execute().data == []  # RLS, no policy
        err = api_error(lambda: client.table("ungranted").select("*").execute())
        assert (err.code, err.message) == ("42501", "permission denied for table ungranted")
    with supabase(gateway, gateway.service_role_key, schema="public") as client:
        rows = client.table("notes").select("*").execute().data
        assert rows == [{"id": 1, "body": "secret"}]  # service_role bypasses RLS
        err = api_error(lambda: client.table("missing").select("*").execute())
        assert err.code == "PGRST205"


def test_database_outage_is_503_then_recovers(pg_cluster: PostgresCluster,
                                              gateway: PostgrestGateway) -> None:
    key = gateway.service_role_key
    assert raw_rpc(gateway, "echo", {"p_a": 1}, key).status_code == 200  # pools a connection
    pg_cluster.stop()
    try:
        response = raw_rpc(gateway, "echo", {"p_a": 1}, key)
        assert response.status_code == 503
        assert response.json()["code"] in ("PGRST000", "PGRST001", "57P01")
        response = raw_rpc(gateway, "echo", {"p_a": 1}, key)
        assert (response.status_code, response.json()["code"]) == (503, "PGRST000")
    finally:
        pg_cluster.start()
    assert raw_rpc(gateway, "echo", {"p_a": 1}, key).status_code == 200
    # a restart under an idle pooled connection costs at most one 503, as with PostgREST
    pg_cluster.restart()
    statuses = [raw_rpc(gateway, "echo", {"p_a": 1}, key).status_code for _ in range(2)]
    assert statuses in ([200, 200], [503, 200])


def test_gateway_stop_closes_client_connections(gateway: PostgrestGateway) -> None:
    with supabase(gateway, gateway.service_role_key) as client:
        assert rpc(client, "echo", {"p_a": 1})["a"] == 1
        gateway.stop()
        with pytest.raises(httpx.TransportError):
            client.rpc("echo", {"p_a": 1}).execute()


def test_keys_are_supabase_shaped() -> None:
    import jwt

    claims = jwt.decode(mint_jwt({"role": "service_role", "tenant": "t"}), TEST_JWT_SECRET,
                        algorithms=["HS256"])
    assert (claims["role"], claims["iss"], claims["tenant"]) == ("service_role", "supabase", "t")
    assert claims["exp"] > claims["iat"]
