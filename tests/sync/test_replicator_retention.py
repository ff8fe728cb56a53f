"""The WAL retention floor holds from the moment a replicator is first made for a store.

A store whose server was unreachable from the start must keep every record until the
server acknowledged it: across its own close, across opens without a replicator (another
process, `walsync checkpoint` / `compact`), and across a machine crash that rebuilds the
snapshot from a base older than the floor. Once the server is reachable, every entry of
the history reaches its entry log (not only the latest version of each key). Detaching
sync for good (`walsync detach`) lets the WAL go again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.sync._helpers import query, server_entry_ids, wait_for, with_port
from walsync.engine import Store, _fs
from walsync.sync.cli import main
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions

pytestmark = pytest.mark.postgres

REPO_ROOT = Path(__file__).resolve().parents[2]
WALSYNC = Path(sys.executable).with_name("walsync")
NO_PULL = ReplicatorOptions(pull=False, batch_wait_seconds=0.001,
                            retry_initial_seconds=0.02, retry_max_seconds=0.2)
SEGMENT_BYTES = 4096


def _closed_port() -> int:
    """A local port nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _unreachable(dsn: str) -> PostgresTransport:
    return PostgresTransport(with_port(dsn, _closed_port()), timeout_seconds=2,
                             connect_timeout_seconds=1)


def _history(store: Store, first: int, count: int) -> None:
    """``count`` puts to four keys: each key gets many versions."""
    for i in range(first, first + count):
        store.put(f"k{i % 4}", {"i": i, "pad": "x" * 200})


def _ship_all(path: Path, dsn: str) -> Replicator:
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        rep = Replicator(store, PostgresTransport(dsn), NO_PULL)
        try:
            rep.run_once()
            assert rep.acked_lsn == store.applied_lsn
        finally:
            rep.close()
    return rep


def _own_entries(dsn: str, node: str) -> list[tuple[int, str]]:
    return sorted((lsn, key) for origin, lsn, key in server_entry_ids(dsn) if origin == node)


def test_retain_floor_holds_every_entry_while_the_server_was_never_reached(
        tmp_path: Path, pg_db: str) -> None:
    migrate(pg_db)
    path = tmp_path / "a"
    store = Store.open(path, node_id="A", segment_bytes=SEGMENT_BYTES)
    rep = Replicator(store, _unreachable(pg_db), NO_PULL).start()
    _history(store, 0, 40)
    wait_for(lambda: rep.status().retries > 0, what="the replicator retrying")
    assert rep.acked_lsn == 0
    assert store.retain_floor == 1
    held = store.info().wal_bytes_held_for_sync
    assert held > 0  # the sealed segments are held for the server
    rep.close()
    store.close()  # closing checkpoints: nothing unacknowledged may go

    _ship_all(path, pg_db)
    assert _own_entries(pg_db, "A") == [(i + 1, f"k{i % 4}") for i in range(40)]


CHILD = """
import sys
from walsync.engine import Store
path, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with Store.open(path, segment_bytes=4096) as store:
    for i in range(first, first + count):
        store.put(f"k{i % 4}", {"i": i, "pad": "x" * 200})
    store.checkpoint()
    store.compact()
    print(store.retain_floor, store.info().wal_bytes_held_for_sync, flush=True)
"""


def test_retain_floor_holds_in_a_process_that_opens_the_store_without_sync(
        tmp_path: Path, pg_db: str) -> None:
    migrate(pg_db)
    path = tmp_path / "a"
    with Store.open(path, node_id="A", segment_bytes=SEGMENT_BYTES) as store:
        # made, never started, never reached the server: the floor holds already
        Replicator(store, _unreachable(pg_db), NO_PULL).close()
        _history(store, 0, 20)

    # another process (the orchestrator, say) writes, checkpoints and compacts
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), "20", "20"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120, check=True)
    floor, held = out.stdout.split()
    assert int(floor) == 1
    assert int(held) > 0
    # and the command line does the same
    for command in (["checkpoint"], ["compact"]):
        done = subprocess.run([str(WALSYNC), *command, "--store", str(path), "--json"],
                              capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
        assert done.returncode == 0, done.stderr
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        assert store.wal_reader().oldest_lsn() == 1

    _ship_all(path, pg_db)
    assert _own_entries(pg_db, "A") == [(i + 1, f"k{i % 4}") for i in range(40)]


CRASH_CHILD = """
import sys, time
from walsync.engine import Store
from walsync.sync.postgres import PostgresTransport
from walsync.sync.replicator import Replicator, ReplicatorOptions
path, dsn = sys.argv[1], sys.argv[2]
store = Store.open(path, segment_bytes=4096)
for i in range(30):
    store.put(f"k{i % 4}", {"i": i, "pad": "x" * 200})
store.checkpoint()  # a base from before sync, and the WAL below it removed
Replicator(store, PostgresTransport(dsn), ReplicatorOptions(pull=False))
for i in range(30, 70):
    store.put(f"k{i % 4}", {"i": i, "pad": "x" * 200})
print(store.next_lsn - 1, flush=True)
time.sleep(60)
"""


@pytest.mark.crash
def test_retain_floor_survives_a_machine_crash_that_rebuilds_the_snapshot_from_an_older_base(
        tmp_path: Path, pg_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    migrate(pg_db)
    path = tmp_path / "a"
    unreachable = with_port(pg_db, _closed_port())
    with subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(path), unreachable],
                          cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            last = int(proc.stdout.readline())
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    assert last == 70
    # a power loss: the snapshot's unsynced pages are garbage, the machine rebooted
    data = path / "snapshot" / "data.mdb"
    data.write_bytes(os.urandom(data.stat().st_size))
    monkeypatch.setattr(_fs, "boot_id", lambda: "a-later-boot-of-this-machine")
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        assert store.recovery is not None
        assert store.recovery.snapshot_rebuilt is not None
        assert store.recovery.snapshot_rebuilt.base_lsn == 30  # the base knew of no floor
        assert store.retain_floor == 1  # the STORE file did
        store.checkpoint()
        oldest = store.wal_reader().oldest_lsn()
        assert oldest is not None
        assert oldest <= 31
        node = store.node_id

    _ship_all(path, pg_db)
    entries = _own_entries(pg_db, node)
    # 1..30 went by the bootstrap path (their WAL was gone before sync was attached);
    # every record from the floor on is in the entry log
    assert [e for e in entries if e[0] > 30] == [(i + 1, f"k{i % 4}") for i in range(30, 70)]


def test_detach_drops_the_floor_for_a_store_that_stops_syncing(tmp_path: Path,
                                                             pg_db: str) -> None:
    migrate(pg_db)
    path = tmp_path / "a"
    with Store.open(path, node_id="A", segment_bytes=SEGMENT_BYTES) as store:
        Replicator(store, _unreachable(pg_db), NO_PULL).close()
        _history(store, 0, 40)
    runner = CliRunner()
    refused = runner.invoke(main, ["detach", "--store", str(path)])
    assert refused.exit_code == 1
    assert "40 entries" in refused.output
    assert "--force" in refused.output
    with Store.open(path) as store:
        assert store.retain_floor == 1  # refused: nothing changed

    status = runner.invoke(main, ["status", "--store", str(path), "--json"],
                           env={"WALSYNC_PG_DSN": pg_db})
    assert status.exit_code == 0, status.output
    doc = json.loads(status.output)
    assert doc["retain_floor"] == 1
    assert doc["wal_bytes_held_for_sync"] > 0

    done = runner.invoke(main, ["detach", "--store", str(path), "--force", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output) == {"retain_floor": 1, "unreplicated_entries": 40}
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        assert store.retain_floor is None
        store.checkpoint()
        assert store.info().wal_bytes_held_for_sync == 0
        assert store.info().segments == 0  # no write since open: no active segment either
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        assert store.retain_floor is None  # for good: a later open keeps no floor

    # attaching sync again later ships the state the WAL no longer holds
    _ship_all(path, pg_db)
    winners = query(pg_db, "select key, origin, lsn from walsync.state order by key")
    assert [(k, o, int(n)) for k, o, n in winners] == [
        (f"k{j}", "A", 37 + j) for j in range(4)]
