"""The recovery point never counts entries the server lacks (PROTOCOL.md,
Idempotency and acknowledgement).

A store synced with one database and pointed at another (empty, migrated), or at its own
database restored from an older backup (a real pg_dump / pg_restore), finds out, says so
(log, status, metric), ships again from what the server holds (from the WAL, or from the
snapshot's versions where the WAL no longer holds the records), and `walsync status` never
reports nothing unreplicated while the server lacks entries. Both transports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.pg import PostgresCluster
from tests.sync._helpers import wait_for
from tests.sync._servers import KINDS, Server, missing_on, server_factory
from walsync.engine import Store
from walsync.sync.cli import main
from walsync.sync.replicator import Replicator, ReplicatorOptions
from walsync.sync.restore import restore

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

OPTIONS = ReplicatorOptions(pull_interval_seconds=0.05, batch_wait_seconds=0.001,
                            retry_initial_seconds=0.02, retry_max_seconds=0.3)
WALSYNC = Path(sys.executable).with_name("walsync")


@pytest.fixture
def servers(pg_cluster: PostgresCluster) -> Iterator[Callable[[str], Server]]:
    yield from server_factory(pg_cluster)


def cli(server: Server, *args: str) -> str:
    result = CliRunner().invoke(main, list(args), env=server.env(), catch_exceptions=False)
    assert result.exit_code == 0, (args, result.output, result.stderr)
    return result.output


def status(server: Server, path: Path) -> dict[str, Any]:
    """`walsync status --json` in its own process (the store may be open here)."""
    env = {k: v for k, v in server.env().items() if v is not None}
    done = subprocess.run([str(WALSYNC), "status", "--store", str(path), "--json"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.stdout.startswith("{"), (done.returncode, done.stderr)
    doc: dict[str, Any] = json.loads(done.stdout)
    # exit 7 is status's verdict "behind" (sync/cli/exits.py), which the document names
    assert done.returncode == (7 if doc["health"] == "behind" else 0), done.stderr
    assert doc["server_error"] is None, doc
    return doc


def restored_values(server: Server, path: Path) -> dict[str, Any]:
    restore(server.transport(), path)
    with Store.open(path, create=False) as store:
        return {key: store.get(key) for key, _ in store.iter_siblings()}


@pytest.mark.parametrize("kind", KINDS)
def test_store_pointed_at_an_empty_database_ships_everything_again(
        tmp_path: Path, servers: Any, kind: str) -> None:
    first, second = servers(kind), servers(kind)
    path = tmp_path / "a"
    expected = {}
    with Store.open(path, node_id="A") as store:
        for i in range(45):
            store.put(f"k/{i % 30}", i)
            expected[f"k/{i % 30}"] = i
    assert "pushed 45 entries, pulled 0; acked LSN 45" in cli(
        first, "sync", "--once", "--store", str(path))

    before = status(second, path)
    assert before["server_id"] == second.server_id() != first.server_id()
    assert before["server_id_local"] == first.server_id()
    assert before["server_changed"] is True
    assert (before["acked_lsn"], before["acked_lsn_local"]) == (0, 45)
    assert before["unreplicated_entries"] == 45
    assert before["recovery_point"] is None

    out = cli(second, "sync", "--once", "--store", str(path))
    assert "pushed 45 entries" in out
    assert "shipped again: the server is another one" in out
    after = status(second, path)
    # the pull cursor went back to 0 (the new server's positions): a merge record
    assert (after["acked_lsn"], after["applied_lsn"]) == (46, 46)
    assert (after["unreplicated_entries"], after["server_changed"]) == (0, False)
    assert after["recovery_point_unix_ms"] is not None
    with Store.open(path) as store:
        assert missing_on(second, store) == []
    assert restored_values(second, tmp_path / "restored") == expected

    # back to the first one: it holds every entry (checked against the WAL, not
    # shipped again), only the acknowledgement of the merge records moves
    assert status(first, path)["unreplicated_entries"] == 0
    assert "pushed 0 entries" in cli(first, "sync", "--once", "--store", str(path))
    assert first.acked("A") == 47
    with Store.open(path) as store:
        assert missing_on(first, store) == []


@pytest.mark.parametrize("kind", KINDS)
def test_database_restored_from_an_older_dump_gets_the_lost_entries_again(
        tmp_path: Path, servers: Any, kind: str) -> None:
    server = servers(kind)
    path = tmp_path / "a"
    backup = tmp_path / "backup.dump"
    expected: dict[str, Any] = {}
    with Store.open(path, node_id="A", remote_timeout_seconds=30) as store:
        rep = Replicator(store, server.transport(), OPTIONS).start()
        try:
            for i in range(20):
                store.put(f"k/{i}", i, durability="remote")
                expected[f"k/{i}"] = i
            server.dump(backup)
            for i in range(20, 45):
                store.put(f"k/{i % 30}", i, durability="remote")
                expected[f"k/{i % 30}"] = i
            assert server.acked("A") == 45
            rep.stop()  # maintenance: the database is put back as the backup had it
            server.restore_dump(backup)
            assert server.acked("A") == 20

            lying = status(server, path)
            assert (lying["acked_lsn"], lying["acked_lsn_local"]) == (20, 45)
            assert lying["server_behind"] is True
            assert lying["server_changed"] is False
            assert lying["unreplicated_entries"] == 25

            rep.start()
            done = store.put("k/last", "x", durability="remote")
            expected["k/last"] = "x"
            assert server.entries()[("A", done.lsn, "k/last")] == "x"
            wait_for(lambda: rep.status().lag_entries == 0, what="the lost entries shipped")
            assert server.acked("A") == store.applied_lsn
            assert missing_on(server, store) == []
            said = rep.status()
            assert said.reships == 1
            assert said.last_reship is not None
            assert "up to 20" in said.last_reship
            assert "shipping again from LSN 21" in said.last_reship
            assert rep.stats().reships == 1
        finally:
            rep.close()
    healed = status(server, path)
    # 46 records and the merge record that moved the pull cursor back to 0
    assert (healed["acked_lsn"], healed["applied_lsn"], healed["unreplicated_entries"]) == (
        47, 47, 0)
    assert healed["server_behind"] is False
    assert restored_values(server, tmp_path / "restored") == expected


@pytest.mark.parametrize("kind", KINDS)
def test_server_behind_what_the_wal_still_holds_gets_the_snapshot_versions(
        tmp_path: Path, servers: Any, kind: str) -> None:
    """The WAL kept only what the server had not acknowledged; the restored server lacks
    more: the store's current versions of those LSNs are shipped from the snapshot."""
    server = servers(kind)
    path = tmp_path / "a"
    backup = tmp_path / "backup.dump"
    expected: dict[str, Any] = {}
    with Store.open(path, node_id="A", segment_bytes=4096) as store:
        for i in range(10):
            store.put(f"k/{i}", i)
            expected[f"k/{i}"] = i
        cli_sync = Replicator(store, server.transport(), OPTIONS)
        cli_sync.run_once()
        server.dump(backup)
        for i in range(200):
            store.put(f"k/{i % 40}", {"i": i, "pad": "x" * 100})
            expected[f"k/{i % 40}"] = {"i": i, "pad": "x" * 100}
        cli_sync.run_once()
        store.checkpoint()  # the acknowledged records leave the WAL
        oldest = store.wal_reader().oldest_lsn()
        assert oldest is not None
        assert oldest > 11
        cli_sync.close()
    server.restore_dump(backup)
    assert status(server, path)["unreplicated_entries"] == 200

    with Store.open(path) as store:
        rep = Replicator(store, server.transport(), OPTIONS)
        rep.run_once()
        rep.close()
        assert missing_on(server, store) == []
        assert rep.status().reships == 1
    assert status(server, path)["unreplicated_entries"] == 0
    assert restored_values(server, tmp_path / "restored") == expected


@pytest.mark.parametrize("kind", KINDS)
def test_recovery_point_has_the_same_names_and_forms_in_status_and_restore(
        tmp_path: Path, servers: Any, kind: str) -> None:
    server = servers(kind)
    path = tmp_path / "a"
    with Store.open(path, node_id="A") as store:
        store.put("k", 1)
        store.put("k", 2)
    cli(server, "sync", "--once", "--store", str(path))
    said = status(server, path)
    report = restore(server.transport(), tmp_path / "b", lost_node="A")
    assert report.recovery_point_unix_ms == said["recovery_point_unix_ms"]
    assert report.recovery_point == said["recovery_point"]
    assert report.recovery_point is not None
    assert report.recovery_point.endswith("+00:00")
    assert report.lost_node_acked_lsn == said["acked_lsn"] == 2


@pytest.mark.parametrize("kind", KINDS)
def test_going_back_to_a_server_ships_only_what_it_lacks(
        tmp_path: Path, servers: Any, kind: str) -> None:
    """Its position there was kept when the store left: back on it, the store ships what
    it wrote meanwhile, though the WAL no longer holds what that server had (nothing is
    shipped twice, no fresh node id for entries it could not compare)."""
    first, second = servers(kind), servers(kind)
    path = tmp_path / "a"
    with Store.open(path, node_id="A", segment_bytes=4096) as store:
        for i in range(150):
            store.put(f"k/{i % 40}", {"i": i, "pad": "x" * 100})
        on_first = Replicator(store, first.transport(), OPTIONS)
        on_first.run_once()
        on_first.close()
        on_second = Replicator(store, second.transport(), OPTIONS)
        on_second.run_once()
        on_second.close()
        assert on_second.status().reships == 1
        for i in range(10):
            store.put(f"new/{i}", i)
        on_second = Replicator(store, second.transport(), OPTIONS)
        on_second.run_once()
        on_second.close()
        store.checkpoint()
        oldest = store.wal_reader().oldest_lsn()
        assert oldest is not None
        assert oldest > 100  # most of what the first server had is gone from the WAL
        back = Replicator(store, first.transport(), OPTIONS)
        pushed, _ = back.run_once()
        back.close()
        assert pushed == 10
        assert (store.node_id, back.status().node_renewals) == ("A", 0)
        assert missing_on(first, store) == []
        assert missing_on(second, store) == []
