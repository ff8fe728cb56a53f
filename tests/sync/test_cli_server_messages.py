"""What the commands that reach the server say when it is not the one configured, not
there, or slow: migrate reads WALSYNC_CONFIG and speaks of migrate, a database that does
not exist is named, `sync --once` prints JSON and shows its backlog's progress on a
terminal (none on a pipe), the worker's --json one event a line. A real PostgreSQL
server throughout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from psycopg.conninfo import make_conninfo

from tests.pg import free_port
from tests.sync._helpers import with_port
from tests.terminal import WALSYNC, in_terminal, plain
from walsync.engine import Store
from walsync.sync.cli import main
from walsync.sync.migrate import migrate

pytestmark = pytest.mark.postgres

EXIT_SERVER = 6
#: every setting that names a server or a store, unset unless a test sets it
SETTINGS = ("WALSYNC_PG_DSN", "WALSYNC_CONFIG", "WALSYNC_TRANSPORT", "WALSYNC_STORE",
            "WALSYNC_SUPABASE_KEY", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY",
            "SUPABASE_ANON_KEY")


def run(*args: str, **env: str) -> Result:
    clean: dict[str, str | None] = {
        **{k: None for k in os.environ if k.startswith(("WALSYNC_", "SUPABASE_"))},
        **dict.fromkeys(SETTINGS)}
    return CliRunner().invoke(main, list(args), env={**clean, **env}, catch_exceptions=False)


def test_migrate_reads_the_dsn_from_a_walsync_config_file(tmp_path: Path, pg_db: str) -> None:
    config = tmp_path / "walsync.conf"
    config.write_text(f"WALSYNC_PG_DSN={pg_db}\n")
    config.chmod(0o600)
    done = run("migrate", "--json", WALSYNC_CONFIG=str(config))
    assert done.exit_code == 0, done.output + done.stderr
    assert json.loads(done.stdout)["applied"]


def test_migrate_hints_speak_of_migrate(tmp_path: Path, pg_db: str) -> None:
    unset = run("migrate")
    assert unset.exit_code == EXIT_SERVER
    assert "WALSYNC_PG_DSN is not set" in unset.stderr
    assert "WALSYNC_CONFIG" in unset.stderr
    unreachable = run("migrate", WALSYNC_PG_DSN=with_port(pg_db, free_port()))
    assert unreachable.exit_code == EXIT_SERVER
    hint = [line for line in unreachable.stderr.splitlines() if line.startswith("hint: ")]
    assert hint, unreachable.stderr
    assert "replicator" not in hint[0]
    assert "SUPABASE" not in hint[0]
    assert "check the DSN in WALSYNC_PG_DSN" in hint[0]


def test_a_database_that_does_not_exist_is_named(tmp_path: Path, pg_db: str) -> None:
    missing = make_conninfo(pg_db, dbname="no_such_database_here")
    path = tmp_path / "s"
    Store.open(path).close()
    for args in (["migrate"], ["sync", "--once", "-s", str(path)], ["leases"]):
        done = run(*args, WALSYNC_PG_DSN=missing)
        assert done.exit_code == EXIT_SERVER, (args, done.output, done.stderr)
        assert "the server has no database 'no_such_database_here'" in done.stderr
        assert "OperationalError" not in done.stderr
        assert "createdb" in done.stderr
    status = run("status", "-s", str(path), WALSYNC_PG_DSN=missing)
    assert status.exit_code == EXIT_SERVER
    assert "no database 'no_such_database_here'" in " ".join(status.stdout.split())


def test_sync_once_json(tmp_path: Path, pg_db: str) -> None:
    migrate(pg_db)
    path = tmp_path / "s"
    with Store.open(path, node_id="J") as store:
        store.put("a", 1)
        store.put("b", 2)
    done = run("sync", "--once", "-s", str(path), "--json", WALSYNC_PG_DSN=pg_db)
    assert done.exit_code == 0, done.output + done.stderr
    doc = json.loads(done.stdout)
    assert (doc["pushed"], doc["pulled"], doc["acked_lsn"], doc["node_id"]) == (2, 0, 2, "J")
    assert doc["node_renewed"] is None
    assert doc["shipped_again"] is None


@pytest.mark.slow
def test_sync_once_shows_its_backlog_on_a_terminal_and_nothing_on_a_pipe(
        tmp_path: Path, pg_db: str) -> None:
    migrate(pg_db)
    path = tmp_path / "s"
    with Store.open(path, node_id="P", durability="none") as store:
        for start in range(0, 60_000, 500):
            with store.batch() as batch:
                for i in range(start, start + 500):
                    batch.put(f"k/{i:06d}", {"n": i, "pad": "x" * 200})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALSYNC_", "SUPABASE_"))}
    env["WALSYNC_PG_DSN"] = pg_db
    code, shown = in_terminal(["sync", "--once", "-s", "s"], cwd=tmp_path, env=env,
                              timeout_seconds=300)
    assert code == 0, shown
    assert "shipping records" in shown
    assert re.search(r"\d[\d,]*/120", shown), shown  # records (of 500 entries) done
    assert "pushed 60000 entries" in plain(shown)

    with Store.open(path) as store:
        for start in range(0, 30_000, 500):
            with store.batch() as batch:
                for i in range(start, start + 500):
                    batch.put(f"q/{i:06d}", i)
    piped = run("sync", "--once", "-s", str(path), WALSYNC_PG_DSN=pg_db)
    assert piped.exit_code == 0, piped.stderr
    assert piped.stderr == ""
    assert piped.stdout.startswith("pushed 30000 entries")


def test_sync_worker_json_is_one_event_a_line(tmp_path: Path, pg_db: str) -> None:
    migrate(pg_db)
    path = tmp_path / "s"
    with Store.open(path, node_id="W") as store:
        store.put("a", 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALSYNC_", "SUPABASE_"))}
    env["WALSYNC_PG_DSN"] = pg_db
    with subprocess.Popen([str(WALSYNC), "sync", "-s", str(path), "--json",
                           "--status-every", "0.2"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        events = []
        try:
            deadline = time.monotonic() + 60
            while not events or events[-1].get("acked_lsn") != 1:
                assert time.monotonic() < deadline, events
                line = proc.stdout.readline()
                assert line, proc.communicate()
                events.append(json.loads(line))
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    events += [json.loads(line) for line in out.splitlines()]
    assert events[0] == {"event": "started", "path": str(path), "node_id": "W",
                         "server": events[0]["server"]}
    assert "password" not in events[0]["server"]
    statuses = [e for e in events if e["event"] == "status"]
    assert statuses
    assert set(statuses[-1]) == {"event", "acked_lsn", "lag_entries", "lag_seconds",
                                 "pulled_entries", "retries"}
    assert events[-1] == {"event": "stopping", "signal": "SIGTERM"}
