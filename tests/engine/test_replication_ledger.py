"""The door between engine and sync: sync's bookkeeping by name and type (SyncLedger),
read from the bytes earlier walsync wrote under string keys, and the Store as a
ReplicationSource."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from walsync.engine import (
    LastError,
    ReadOnlyStoreError,
    ReplicationSource,
    Store,
    StoreClosedError,
    UnshippedEntry,
)


def _le(n: int) -> bytes:
    return n.to_bytes(8, "little")


def test_replication_ledger_reads_the_fields_as_earlier_walsync_wrote_them(
        tmp_path: Path) -> None:
    """Stores synced before the ledger existed hold its fields under these raw names and
    encodings: the typed reads must give the same values (no migration on open)."""
    path = tmp_path / "s"
    with Store.open(path) as store:
        store.put("k", 1)
        store.set_sync_state("acked_lsn", _le(7))
        store.set_sync_state("pull_cursor", _le(12))
        store.set_sync_state("server_id", b"server-a")
        store.set_sync_state("server_positions", json.dumps({"server-b": 5}).encode())
        store.set_sync_state("last_error", json.dumps(
            {"message": "down", "at_unix": 1700000000.5, "stopped": True}).encode())
        store.set_sync_state("unshipped", json.dumps(
            [{"lsn": 3, "key": "n\x00ul", "reason": "NUL"}]).encode())
        store.apply_remote([], pull_cursor=9)
        store.set_retain_floor(8)
    with Store.open(path, readonly=True) as store:
        state = store.sync_ledger.state()
        assert state.acked_lsn == 7
        assert state.pull_cursor == 9
        assert store.sync_ledger.skipped_pull_cursor == 12
        assert state.server_id == "server-a"
        assert dict(state.server_positions) == {"server-b": 5}
        assert state.last_error == LastError("down", 1700000000.5, True)
        assert state.unshipped == (UnshippedEntry(3, "n\x00ul", "NUL"),)
        assert state.retain_floor == 8
        assert state.synced_before


def test_replication_ledger_writes_the_encodings_earlier_walsync_reads(tmp_path: Path) -> None:
    """The other way: what the ledger writes is byte for byte what the string-keyed code
    wrote, so a store can still be opened by the walsync before this one."""
    with Store.open(tmp_path / "s") as store:
        ledger = store.sync_ledger
        assert not ledger.synced_before
        assert ledger.state().acked_lsn == 0
        assert ledger.server_id is None
        ledger.set_acked_lsn(41)
        ledger.set_skipped_pull_cursor(17)
        ledger.set_server_id("server-a")
        ledger.set_server_positions({"server-b": 3})
        ledger.set_last_error(LastError("refused", 12.25, False))
        ledger.set_unshipped([UnshippedEntry(2, "k", "fence out of range")])
        assert store.sync_state("acked_lsn") == _le(41)
        assert store.sync_state("pull_cursor") == _le(17)
        assert store.sync_state("server_id") == b"server-a"
        assert json.loads(store.sync_state("server_positions") or b"") == {"server-b": 3}
        assert json.loads(store.sync_state("last_error") or b"") == {
            "message": "refused", "at_unix": 12.25, "stopped": False}
        assert json.loads(store.sync_state("unshipped") or b"") == [
            {"lsn": 2, "key": "k", "reason": "fence out of range"}]
        assert ledger.synced_before
        ledger.set_server_id(None)
        assert ledger.server_id is None


def test_replication_ledger_survives_a_reopen_and_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Store.open(path) as store:
        store.put("k", 1)
        store.sync_ledger.set_acked_lsn(1)
        store.apply_remote([], pull_cursor=4)
        store.checkpoint()
    with Store.open(path) as store:
        assert (store.sync_ledger.acked_lsn, store.sync_ledger.pull_cursor) == (1, 4)


def test_replication_ledger_takes_damaged_json_for_no_value(tmp_path: Path) -> None:
    """A field that does not decode is read as absent (positions, unshipped) or as its
    text (the last error): `walsync status` still answers."""
    with Store.open(tmp_path / "s") as store:
        store.set_sync_state("server_positions", b"{not json")
        store.set_sync_state("unshipped", b"[1, 2")
        store.set_sync_state("last_error", b"plain words")
        ledger = store.sync_ledger
        assert ledger.server_positions == {}
        assert ledger.unshipped == []
        assert ledger.last_error == LastError("plain words", 0.0, False)


def test_replication_ledger_writes_are_refused_where_writes_are(tmp_path: Path) -> None:
    path = tmp_path / "s"
    Store.open(path).close()
    with Store.open(path, readonly=True) as store, pytest.raises(ReadOnlyStoreError):
        store.sync_ledger.set_acked_lsn(1)
    store = Store.open(path)
    store.close()
    with pytest.raises(StoreClosedError):
        store.sync_ledger.set_server_id("x")


def test_store_has_every_member_of_replication_source(tmp_path: Path) -> None:
    """mypy checks the Store against the Protocol (engine/store.py); this checks the
    Protocol names nothing a Store lacks at run time."""
    members = {name for name in vars(ReplicationSource) if not name.startswith("_")}
    assert {"wal_reader", "apply_remote", "sync_ledger", "shippable_lsn",
            "retain_floor", "attach_replicator", "add_commit_listener"} <= members
    with Store.open(tmp_path / "s") as store:
        missing = [name for name in sorted(members) if not hasattr(store, name)]
    assert missing == []
