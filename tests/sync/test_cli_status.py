"""`walsync status`: recovery point, unreplicated age, leases held, the worker's last error,
and the health verdict it exits with (0 ok, 6 unreachable, 7 behind, 8 beyond --max-lag)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.pg import PostgresCluster, free_port
from tests.sync._helpers import with_port
from tests.sync._servers import Server
from walsync.engine import Store
from walsync.sync.cli import main
from walsync.sync.lease import Leases
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions

pytestmark = pytest.mark.postgres


def _status(store: Path, dsn: str) -> dict[str, object]:
    out = CliRunner().invoke(main, ["status", "--store", str(store), "--json"],
                             env={"WALSYNC_PG_DSN": dsn})
    assert out.exit_code == 0, out.output
    return dict(json.loads(out.output))


def test_status_reports_unreplicated_age_then_the_recovery_point(tmp_path: Path,
                                                                pg_db: str) -> None:
    migrate(pg_db)
    path = tmp_path / "s"
    with Store.open(path) as store:
        store.set_retain_floor(1)
        store.put("runs/1", {"step": 1})
        store.put("runs/1/steps/a", "done")
    time.sleep(0.2)
    before = _status(path, pg_db)
    assert before["unreplicated_entries"] == 2
    age = before["oldest_unreplicated_age_seconds"]
    assert isinstance(age, float)
    assert age >= 0.2
    assert before["leases_held"] == []
    with Store.open(path) as store:
        rep = Replicator(store, PostgresTransport(pg_db), ReplicatorOptions(pull=False))
        rep.ship()
        rep.close()
        node = store.node_id
    leases = Leases(PostgresTransport(pg_db), node, ttl_seconds=30)
    leases.acquire("1")
    after = _status(path, pg_db)
    assert after["unreplicated_entries"] == 0
    assert after["oldest_unreplicated_age_seconds"] is None
    assert after["acked_lsn"] == 2
    assert isinstance(after["recovery_point_unix_ms"], int)
    assert abs(after["recovery_point_unix_ms"] / 1000 - time.time()) < 60
    assert after["leases_held"] == ["1"]
    leases.transport.close()


def test_status_shows_the_error_that_stopped_the_worker(tmp_path: Path, pg_db: str) -> None:
    path = tmp_path / "s"
    with Store.open(path) as store:
        store.put("k", 1)
        rep = Replicator(store, PostgresTransport(pg_db)).start()  # no schema: permanent
        deadline = time.monotonic() + 20
        while rep.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rep.error is not None
        rep.close()
    migrate(pg_db)
    report = _status(path, pg_db)
    error = report["last_error"]
    assert isinstance(error, dict)
    assert error["stopped"] is True
    assert "walsync_api" in str(error["message"]) or "schema" in str(error["message"]).lower()


# -- a health check: the verdict as the exit code ----------------------------------------


def _run_status(store: Path, dsn: str, *extra: str) -> tuple[int, dict[str, object], str]:
    env = {"WALSYNC_PG_DSN": dsn, "WALSYNC_CONFIG": None, "SUPABASE_URL": None}
    human = CliRunner().invoke(main, ["status", "--store", str(store), *extra], env=env)
    out = CliRunner().invoke(main, ["status", "--store", str(store), "--json", *extra], env=env)
    assert out.exit_code == human.exit_code, (out.output, human.output)
    return out.exit_code, dict(json.loads(out.stdout)), human.stdout


def _row(table: str, name: str) -> str:
    """A row's value, its folded continuation lines joined."""
    lines = table.splitlines()
    [start] = [n for n, line in enumerate(lines) if line.startswith(name + " ")]
    parts = [lines[start][len(name):].strip()]
    for line in lines[start + 1:]:
        if line[:1] != " ":
            break
        parts.append(line.strip())
    return " ".join(parts)


def _ship(path: Path, dsn: str) -> None:
    with Store.open(path) as store:
        rep = Replicator(store, PostgresTransport(dsn), ReplicatorOptions(pull=False))
        rep.sync_once(30)
        rep.close()


def test_status_exit_codes_ok_lagging_behind_unreachable(tmp_path: Path, pg_db: str,
                                                         pg_cluster: PostgresCluster) -> None:
    migrate(pg_db)
    path = tmp_path / "s"
    with Store.open(path, node_id="n1") as store:
        store.put("a", 1)
        store.put("b", 2)
    time.sleep(0.5)
    code, doc, table = _run_status(path, pg_db)
    assert (code, doc["health"]) == (0, "ok")  # a lag with no limit is healthy
    code, doc, table = _run_status(path, pg_db, "--max-lag", "60")
    assert (code, doc["health"], doc["max_lag_seconds"]) == (0, "ok", 60.0)
    code, doc, table = _run_status(path, pg_db, "--max-lag", "0.2")
    assert (code, doc["health"]) == (8, "lagging")
    assert _row(table, "health") == "LAGGING: writes older than 0.2 s are not on the server"
    assert re.fullmatch(r"2 entries, the oldest written [\d.]+ s ago",
                        _row(table, "not on the server"))

    _ship(path, pg_db)
    code, doc, table = _run_status(path, pg_db, "--max-lag", "0.2")
    assert (code, doc["health"], doc["unreplicated_entries"]) == (0, "ok", 0)
    assert _row(table, "not on the server") == "nothing"

    # another database, migrated: a server that never acknowledged this store
    other = pg_cluster.create_database(f"walsync_other_{os.getpid()}")
    try:
        migrate(other)
        code, doc, table = _run_status(path, other)
        assert (code, doc["health"], doc["server_changed"]) == (7, "behind", True)
        assert _row(table, "health").startswith("BEHIND: another server")
    finally:
        pg_cluster.drop_database(f"walsync_other_{os.getpid()}")

    code, doc, table = _run_status(path, with_port(pg_db, free_port()))
    assert (code, doc["health"]) == (6, "unreachable")
    assert "cannot reach the database" in " ".join(table.split())


def test_status_behind_when_the_server_lost_what_it_acknowledged(tmp_path: Path,
                                                                 pg_db: str) -> None:
    """A database put back from a backup holds less than it acknowledged: exit 7."""
    migrate(pg_db)
    server = Server("postgres", pg_db, None)
    path = tmp_path / "s"
    with Store.open(path, node_id="n1") as store:
        store.put("k0", 0)
        store.put("k1", 1)
    _ship(path, pg_db)
    server.dump(tmp_path / "backup")
    with Store.open(path) as store:
        store.put("k2", 2)
        store.put("k3", 3)
    _ship(path, pg_db)
    assert _run_status(path, pg_db)[0] == 0
    server.restore_dump(tmp_path / "backup")
    assert server.acked("n1") == 2
    code, doc, table = _run_status(path, pg_db)
    assert (code, doc["health"], doc["server_behind"]) == (7, "behind", True), doc
    assert _row(table, "health") == "BEHIND: the server holds less than it acknowledged"


def test_status_clears_an_error_a_later_sync_got_past(tmp_path: Path, pg_db: str) -> None:
    """An error from an earlier, wrong DSN is not shown once a sync succeeded."""
    path = tmp_path / "s"
    with Store.open(path) as store:
        store.put("k", 1)
        wrong = with_port(pg_db, free_port())
        rep = Replicator(store, PostgresTransport(wrong)).start()
        deadline = time.monotonic() + 20
        while store.sync_ledger.last_error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        rep.close()
        assert store.sync_ledger.last_error is not None
    migrate(pg_db)
    code, doc, table = _run_status(path, pg_db)
    assert doc["last_error"] is not None
    assert "cannot reach the database" in " ".join(_row(table, "last sync error").split())
    _ship(path, pg_db)
    code, doc, table = _run_status(path, pg_db)
    assert (code, doc["last_error"]) == (0, None)
    assert "last sync error" not in table
