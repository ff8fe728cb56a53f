"""sync/status.py and what the CLI prints of it: a store's status against its server,
detaching a store from sync, the one-shot sync of `walsync sync --once`
(``Replicator.sync_once``) and the leases listing (`walsync leases`).

The commands only print what these library calls return (tests/test_cli.py keeps
the CLI from doing the work itself), so the status is checked here as a typed
value and once as printed.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.pg import free_port
from tests.sync._helpers import with_port
from walsync.engine import Store
from walsync.engine.errors import RemoteSchemaError, RemoteUnavailableError, SyncError
from walsync.engine.versions import HLC_LOGICAL_BITS
from walsync.sync.cli import main
from walsync.sync.lease import Leases
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.status import detach, sync_status, unix_ms_of

#: the order `walsync status` prints its fields in when the server answered
FIELDS = ["node_id", "applied_lsn", "acked_lsn_local", "pull_cursor", "retain_floor",
          "wal_bytes_held_for_sync", "server", "server_id_local", "last_error", "unshipped",
          "acked_lsn", "server_id", "server_head", "server_behind", "server_changed",
          "recovery_point_unix_ms", "recovery_point", "leases_held", "server_error",
          "server_error_hint", "unreplicated_entries", "oldest_unreplicated_age_seconds"]
#: and when it could not be asked (the server's own fields left out)
LOCAL_FIELDS = [f for f in FIELDS if f not in {
    "server_id", "server_head", "server_behind", "server_changed", "recovery_point_unix_ms",
    "recovery_point", "leases_held"}]

NO_SERVER: dict[str, str] = {}


def test_unix_ms_of_drops_the_logical_counter() -> None:
    assert unix_ms_of((1_700_000_000_123 << HLC_LOGICAL_BITS) | 0xFFFF) == 1_700_000_000_123
    assert unix_ms_of(0) == 0


def test_status_without_a_server_gives_the_local_facts_and_why(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", node_id="n1") as store:
        store.set_retain_floor(1)
        store.put("a", 1)
        store.put("b", 2)
        time.sleep(0.05)
        status = sync_status(store, NO_SERVER)
        assert store.sync_ledger.acked_lsn == 0
    assert status.server_view is None
    assert status.server_error is not None
    assert "WALSYNC_PG_DSN" in status.server_error
    assert (status.node_id, status.applied_lsn, status.acked_lsn) == ("n1", 2, 0)
    assert status.unreplicated_entries == 2
    assert status.oldest_unreplicated_age_seconds is not None
    assert status.oldest_unreplicated_age_seconds >= 0.05
    assert status.server == "<not configured>"
    fields = status.fields()
    assert list(fields) == LOCAL_FIELDS
    assert fields["unshipped"] == []
    assert fields["last_error"] is None


@pytest.mark.postgres
def test_status_against_the_server_counts_what_it_holds_and_the_live_leases(
        tmp_path: Path, pg_db: str) -> None:
    migrate(pg_db)
    env = {"WALSYNC_PG_DSN": pg_db}
    path = tmp_path / "s"
    with Store.open(path, node_id="n1") as store:
        for i in range(3):
            store.put(f"k{i}", i)
        before = sync_status(store, env)
        rep = Replicator(store, PostgresTransport(pg_db), ReplicatorOptions(pull=False))
        assert rep.sync_once(30) == (3, 0)
        rep.close()
        store.put("later", True)
    transport = PostgresTransport(pg_db)
    try:
        Leases(transport, "n1", ttl_seconds=60).acquire("live-run")
        Leases(transport, "n1", ttl_seconds=0.2).acquire("expired-run")
        Leases(transport, "someone-else", ttl_seconds=60).acquire("their-run")
        time.sleep(0.4)  # the database's clock passes the short lease's expiry
        with Store.open(path) as store:
            after = sync_status(store, env)
            shipped_hlc = max(rec.hlc for rec in store.wal_reader().read(0, 3, 10))
    finally:
        transport.close()

    assert before.server_error is None
    assert before.server_view is not None
    assert (before.acked_lsn, before.unreplicated_entries) == (0, 3)
    assert before.server_view.recovery_point_unix_ms is None

    assert after.server_error is None
    view = after.server_view
    assert view is not None
    assert (after.acked_lsn, after.recorded.acked_lsn, after.unreplicated_entries) == (3, 3, 1)
    assert view.leases_held == ["live-run"]
    assert view.recovery_point_unix_ms == shipped_hlc >> HLC_LOGICAL_BITS
    assert view.recovery_point is not None
    assert view.recovery_point.endswith("+00:00")
    assert (view.server_behind, view.server_changed) == (False, False)
    assert view.server_id == after.recorded.server_id
    assert list(after.fields()) == FIELDS

    # printed: a table of facts in human units; JSON: the fields, the verdict with them
    out = CliRunner().invoke(main, ["status", "--store", str(path)], env=env)
    assert out.exit_code == 0, out.output
    rows = {line[:19].strip(): line[19:] for line in out.stdout.splitlines()}
    assert rows["health"] == "ok"
    assert rows["leases held"] == "live-run"
    assert rows["acknowledged"] == "up to LSN 3 (server head 3)"
    assert re.fullmatch(r"1 entry, the oldest written [\d.]+ s ago", rows["not on the server"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \([\d.]+ s ago\)",
                        rows["recovery point"]), rows
    assert "None" not in out.stdout
    assert "[]" not in out.stdout
    shown = json.loads(CliRunner().invoke(main, ["status", "--store", str(path), "--json"],
                                          env=env).stdout)
    assert set(shown) == {*FIELDS, "health", "max_lag_seconds"}
    assert shown["health"] == "ok"
    assert shown["leases_held"] == ["live-run"]


@pytest.mark.postgres
def test_leases_command_lists_the_servers_leases(tmp_path: Path, pg_db: str) -> None:
    migrate(pg_db)
    env = {"WALSYNC_PG_DSN": pg_db}
    transport = PostgresTransport(pg_db)
    try:
        Leases(transport, "n1", ttl_seconds=60).acquire("r1")
        Leases(transport, "n2", ttl_seconds=0.2).acquire("r2")
        time.sleep(0.4)
    finally:
        transport.close()
    out = CliRunner().invoke(main, ["leases"], env=env)
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["run", "holder", "token", "state"]
    assert [line.split()[:4] for line in lines[1:]] == [["r1", "n1", "1", "live,"],
                                                       ["r2", "n2", "1", "expired"]]
    assert re.search(r"live, expires \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(in [^)]+\)$",
                     lines[1]), lines[1]
    assert re.search(r"expired \S+ \S+ UTC \([\d.]+ s ago\)$", lines[2]), lines[2]
    assert "until" not in out.stdout
    nobody = CliRunner().invoke(main, ["leases", "--holder", "n3"], env=env)
    assert (nobody.exit_code, nobody.stdout) == (0, "no leases on the server held by n3\n")
    rows = [json.loads(line) for line in CliRunner().invoke(
        main, ["leases", "--json", "--holder", "n1"], env=env).stdout.splitlines()]
    assert [(r["run_id"], r["holder"], r["token"], r["live"]) for r in rows] == [
        ("r1", "n1", 1, True)]
    assert set(rows[0]) == {"run_id", "holder", "token", "expires_at", "live"}


def test_detach_refuses_while_entries_are_unacknowledged(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", node_id="n1") as store:
        assert detach(store).retain_floor is None  # never synced: nothing held
        store.set_retain_floor(1)
        store.put("a", 1)
        store.put("b", 2)
        with pytest.raises(SyncError, match=r"2 entries .* \(LSN 1\.\.2\)") as refused:
            detach(store)
        assert "--force" in refused.value.hint
        assert store.retain_floor == 1
        report = detach(store, force=True)
        assert (report.retain_floor, report.unreplicated_entries) == (1, 2)
        assert store.retain_floor is None


@pytest.mark.postgres
def test_sync_once_gives_up_on_an_unreachable_server_after_its_timeout(
        tmp_path: Path, pg_db: str) -> None:
    with Store.open(tmp_path / "s") as store:
        store.put("k", 1)
        rep = Replicator(store, PostgresTransport(with_port(pg_db, free_port())),
                         ReplicatorOptions(retry_initial_seconds=0.05, retry_max_seconds=0.2))
        started = time.monotonic()
        try:
            with pytest.raises(RemoteUnavailableError):
                rep.sync_once(1.0)
        finally:
            rep.close()
        took = time.monotonic() - started
        assert 1.0 <= took < 10, took
        assert rep.status().retries >= 2  # retried until the deadline, not once


@pytest.mark.postgres
def test_sync_once_raises_a_permanent_error_at_once(tmp_path: Path, pg_db: str) -> None:
    with Store.open(tmp_path / "s") as store:
        store.put("k", 1)
        rep = Replicator(store, PostgresTransport(pg_db))  # no schema: permanent
        started = time.monotonic()
        try:
            with pytest.raises(RemoteSchemaError):
                rep.sync_once(60)
        finally:
            rep.close()
        assert time.monotonic() - started < 10
        assert rep.status().retries == 0
