"""`walsync status`: recovery point, unreplicated age, leases held, the worker's last error."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

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
