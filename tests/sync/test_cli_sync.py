"""The sync commands of the CLI against a real database: migrate, sync --once, status --json,
conflicts list / resolve. Credentials come from the environment only (CliRunner env=) and
the DSN's password never appears in any output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from psycopg.conninfo import conninfo_to_dict

from tests.pg import PostgresCluster, free_port
from tests.sync._helpers import (
    PASSWORD_ROLE,
    dbname,
    ensure_password_role,
    password_dsn,
    query,
    server_entry_ids,
    with_port,
)
from walsync.engine import Store
from walsync.engine.handoff import sync_holder_pid
from walsync.sync.cli import main
from walsync.sync.migrate import list_migrations

pytestmark = pytest.mark.postgres

#: the cluster trusts loopback logins, so any password works: it is here to be hidden
SECRET = "tr0ub4dor-and-3-secret"
UNSET = ("WALSYNC_PG_DSN", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "WALSYNC_CONFIG",
         "WALSYNC_TRANSPORT", "WALSYNC_STORE")


WALSYNC = Path(sys.executable).with_name("walsync")
#: the exit code of a command whose server is not configured, unreachable or refuses it
EXIT_SERVER = 6


def environment(dsn: str | None) -> dict[str, str | None]:
    env: dict[str, str | None] = dict.fromkeys(UNSET)
    if dsn is not None:
        env["WALSYNC_PG_DSN"] = dsn
    return env


class Cli:
    """Runs commands with one environment and checks every output for the secret."""

    def __init__(self, dsn: str | None, secret: str = SECRET) -> None:
        self.env = environment(dsn)
        self.secret = secret
        self.outputs: list[str] = []

    def __call__(self, *args: str, code: int = 0) -> Result:
        result = CliRunner().invoke(main, list(args), env=self.env, catch_exceptions=False)
        self.outputs.append(result.output + result.stderr)
        assert self.secret not in result.output
        assert self.secret not in result.stderr
        assert result.exit_code == code, (args, result.exit_code, result.output, result.stderr)
        return result

    def json(self, *args: str, code: int = 0) -> Any:
        return json.loads(self(*args, "--json", code=code).stdout)

    def lines(self, *args: str) -> list[Any]:
        return [json.loads(line) for line in self(*args, "--json").stdout.splitlines()
                if line.strip()]


@pytest.fixture
def dsn(pg_db: str) -> str:
    return f"{pg_db} password={SECRET}"


@pytest.fixture
def cli(dsn: str) -> Cli:
    return Cli(dsn)


def port_of(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["port"])


def init_store(cli: Cli, path: Path, node: str) -> str:
    cli("init", str(path), "--node-id", node)
    return str(path)


def test_cli_migrate_twice_is_idempotent(cli: Cli, pg_db: str) -> None:
    files = [path.name for _, path in list_migrations()]
    first = cli("migrate")
    assert "applied 20261123000001_walsync_schema.sql" in first.output
    assert f"schema up to date ({len(files)} applied, 0 already there)" in first.output
    again = cli.json("migrate")
    assert again["applied"] == []
    assert again["already"] == files
    assert files[:3] == ["20261123000001_walsync_schema.sql",
                         "20261123000002_leases_restore.sql",
                         "20261123000003_push_faster.sql"]
    assert query(pg_db, "select count(*) from walsync.schema_migrations") == [(len(files),)]
    # the server's identity, made once: the same on every later run
    assert again["server_id"] == query(pg_db, "select server_id::text from walsync.server")[0][0]


def test_cli_sync_once_ships_and_status_reports_the_recovery_point(
        cli: Cli, tmp_path: Path, pg_db: str) -> None:
    cli("migrate")
    a = init_store(cli, tmp_path / "a", "A")
    for key, value in (("x", "1"), ("y", '{"n": 2}'), ("z", "[3]")):
        cli("put", "--store", a, key, value)

    before = cli.json("status", "--store", a)
    assert before["node_id"] == "A"
    assert before["server_error"] is None
    assert (before["acked_lsn"], before["unreplicated_entries"]) == (0, 3)
    assert before["recovery_point_unix_ms"] is None
    assert before["server"] == f"postgresql://127.0.0.1:{port_of(pg_db)}/{dbname(pg_db)}"

    synced = cli("sync", "--once", "--store", a)
    assert "pushed 3 entries, pulled 0; acked LSN 3" in synced.output
    after = cli.json("status", "--store", a)
    assert (after["acked_lsn"], after["acked_lsn_local"], after["unreplicated_entries"]) == (
        3, 3, 0)
    assert abs(after["recovery_point_unix_ms"] - time.time() * 1000) < 60_000
    assert after["server_head"] == 3
    assert sorted(server_entry_ids(pg_db)) == [("A", 1, "x"), ("A", 2, "y"), ("A", 3, "z")]

    # a second node pulls A's writes; its own status counts nothing unreplicated
    b = init_store(cli, tmp_path / "b", "B")
    cli("put", "--store", b, "from-b", "true")
    out = cli("sync", "--once", "--store", b)
    assert "pushed 1 entries, pulled 3" in out.output
    assert json.loads(cli("get", "--store", b, "y").output) == {"n": 2}
    status_b = cli.json("status", "--store", b)
    assert status_b["pull_cursor"] == 4  # past its own entry too
    assert status_b["unreplicated_entries"] == 0, status_b
    again = cli("sync", "--once", "--store", b)
    assert "pushed 0 entries, pulled 0" in again.output


def test_cli_conflicts_list_and_resolve(cli: Cli, tmp_path: Path, pg_db: str) -> None:
    cli("migrate")
    a = init_store(cli, tmp_path / "a", "A")
    b = init_store(cli, tmp_path / "b", "B")
    cli("put", "--store", a, "doc", '{"by": "A"}')
    cli("put", "--store", b, "doc", '{"by": "B"}')  # concurrent: neither saw the other
    cli("put", "--store", a, "calm", "1")
    for store in (a, b, a):
        cli("sync", "--once", "--store", store)

    for store in (a, b):
        listed = cli.lines("conflicts", "list", "--store", store)
        assert [row["key"] for row in listed] == ["doc"]
        values = sorted(json.dumps(s["value"], sort_keys=True) for s in listed[0]["siblings"])
        assert values == ['{"by": "A"}', '{"by": "B"}']
        text = cli("conflicts", "list", "--store", store).output
        assert text.splitlines()[0] == "doc"
        assert "A:1" in text
        assert "B:1" in text
    assert cli.lines("conflicts", "list", "--store", a, "zzz") == []  # prefix filter
    assert query(pg_db, "select key, versions from walsync.conflicts") == [("doc", 2)]

    resolved = cli("conflicts", "resolve", "--store", b, "doc", '{"by": "both"}')
    assert "resolved 'doc' (2 versions) at LSN" in resolved.output
    assert cli.lines("conflicts", "list", "--store", b) == []
    for store in (b, a):
        cli("sync", "--once", "--store", store)
    assert cli.lines("conflicts", "list", "--store", a) == []
    assert json.loads(cli("get", "--store", a, "doc").output) == {"by": "both"}
    assert query(pg_db, "select count(*) from walsync.conflicts") == [(0,)]
    assert query(pg_db, "select origin from walsync.state where key = 'doc'") == [("B",)]

    bad = cli("conflicts", "resolve", "--store", a, "doc", "{not json", code=2)
    assert "not JSON" in bad.output + bad.stderr


def test_cli_missing_config_is_a_clear_error(tmp_path: Path) -> None:
    cli = Cli(None)
    store = init_store(cli, tmp_path / "s", "S")
    for args in (("sync", "--once", "--store", store), ("migrate",)):
        result = cli(*args, code=EXIT_SERVER)
        assert result.stderr.startswith("error: "), result.stderr
        assert "WALSYNC_PG_DSN" in result.stderr
        if args[0] == "sync":
            assert "SUPABASE_URL" in result.stderr
            assert "SUPABASE_SERVICE_ROLE_KEY" in result.stderr
    status = cli.json("status", "--store", store, code=EXIT_SERVER)  # local facts shown ...
    assert status["applied_lsn"] == 0
    assert "WALSYNC_PG_DSN" in status["server_error"]  # ... with what to set
    assert "SUPABASE_URL" in status["server_error"]
    half = Cli(None)
    half.env["SUPABASE_URL"] = "http://127.0.0.1:9"
    result = half("sync", "--once", "--store", store, code=EXIT_SERVER)
    assert "SUPABASE_SERVICE_ROLE_KEY" in result.stderr
    key = "eyJhbGciOiJIUzI1NiJ9.e30.c2VjcmV0LXNpZ25hdHVyZQ"
    malformed = Cli(None, secret=key)
    malformed.env.update(SUPABASE_URL="myproject.supabase.co", SUPABASE_SERVICE_ROLE_KEY=key)
    result = malformed("sync", "--once", "--store", store, code=EXIT_SERVER)  # no traceback
    assert result.stderr.startswith("error: ")
    assert "SUPABASE_URL" in result.stderr
    assert "https://" in result.stderr


def test_cli_wrong_password_fails_fast_without_showing_it(
        tmp_path: Path, pg_db: str, pg_cluster: PostgresCluster) -> None:
    ensure_password_role(pg_cluster)
    wrong = "definitely-not-the-password-42"
    cli = Cli(password_dsn(pg_cluster, dbname(pg_db), wrong), secret=wrong)
    store = init_store(cli, tmp_path / "s", "S")
    cli("put", "--store", store, "k", "1")
    started = time.monotonic()
    result = cli("sync", "--once", "--store", store, code=EXIT_SERVER)  # permanent: no retries
    assert time.monotonic() - started < 20
    assert "password authentication failed" in result.stderr
    assert PASSWORD_ROLE in result.stderr
    assert "hint:" in result.stderr
    status = cli.json("status", "--store", store, code=EXIT_SERVER)
    assert "password authentication failed" in status["server_error"]
    assert status["unreplicated_entries"] == 1
    migrate = cli("migrate", code=EXIT_SERVER)
    assert migrate.stderr.startswith("error: ")
    assert "hint: migrate needs a role that may create schemas" in migrate.stderr


def test_cli_sync_once_gives_up_when_the_server_is_unreachable(tmp_path: Path,
                                                               pg_db: str) -> None:
    cli = Cli(with_port(pg_db, free_port()) + f" password={SECRET}")
    store = init_store(cli, tmp_path / "s", "S")
    cli("put", "--store", store, "k", "1")
    started = time.monotonic()
    result = cli("sync", "--once", "--timeout", "2", "--store", store, code=EXIT_SERVER)
    assert time.monotonic() - started < 15
    assert "cannot reach" in result.stderr
    assert query(pg_db, "select 1") == [(1,)]  # (the real server was never touched)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_sync_worker_stops_cleanly_on_sigterm_and_sigint(
    cli: Cli, tmp_path: Path, pg_db: str, signum: signal.Signals
) -> None:
    """What a service manager sends (SIGTERM) and Ctrl-C both stop the worker with a
    cleanly closed store (exit 0 for SIGTERM, 130 for Ctrl-C as for every command),
    even when it was started with SIGINT ignored (as a shell's background job is)."""
    cli("migrate")
    path = init_store(cli, tmp_path / "s", "W")
    with Store.open(path) as store:
        for i in range(5):
            store.put(f"k{i}", i)
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env["WALSYNC_PG_DSN"] = pg_db
    with subprocess.Popen(
        [str(WALSYNC), "sync", "--store", path, "--status-every", "0"], env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    ) as proc:
        try:
            deadline = time.monotonic() + 30
            while len(server_entry_ids(pg_db)) < 5:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the worker never shipped"
                time.sleep(0.05)
            # the worker syncs beside the writer, never as one (engine/worker.py)
            assert sync_holder_pid(Path(path)) == proc.pid
            assert not (Path(path) / "OPEN").exists()
            proc.send_signal(signum)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == (130 if signum == signal.SIGINT else 0), err
    assert "Traceback" not in err
    assert f"stopping ({signum.name})" in out
    assert not (Path(path) / "OPEN").exists(), "the store was not closed cleanly"
    assert sync_holder_pid(Path(path)) is None, "the worker kept SYNC.lock"
