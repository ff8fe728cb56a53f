"""Snapshot entries are sealed (a checksum over key and entry) and checked on every read;
verify checks both LMDB files and the snapshot against base + WAL; repair rebuilds; open,
verify and repair apply one rule to a damaged end of the log.

Damage is real: bytes changed in the files on disk. The CLI runs in-process with
``catch_exceptions=False``, so a traceback fails the test.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import lmdb
import pytest
from click.testing import CliRunner, Result

from walsync import engine
from walsync.engine import CorruptionError, FormatVersionError, LSNGapError, Store, _fs
from walsync.engine.record import encode_entry
from walsync.engine.replay import describe_torn_tail
from walsync.engine.snapshot.bulk import write_raw
from walsync.engine.snapshot.seal import SNAPSHOT_FORMAT_VERSION, unseal
from walsync.engine.versions import Sibling, Version
from walsync.sync.cli import main

EXIT_OK, EXIT_DAMAGE = 0, 3
REPO_ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _replace_once(path: Path, old: bytes, new: bytes) -> None:
    """Change the one occurrence of ``old`` in a file."""
    data = path.read_bytes()
    assert data.count(old) == 1, f"{old!r} occurs {data.count(old)} times in {path}"
    path.write_bytes(data.replace(old, new))


def _replace_every(path: Path, old: bytes, new: bytes) -> None:
    """Change ``old`` wherever it occurs (a live page and the free copies of it)."""
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new))


def _cbor_entry_head(value: Any) -> bytes:
    """The first bytes of a single-sibling entry holding ``value`` (uncompressed)."""
    data = cbor2.dumps(value)
    return b"\x81\x87" + cbor2.dumps(data)


def _every_read(store: Store, key: str) -> dict[str, Callable[[], Any]]:
    """Every way a value of ``key`` can be read from the snapshot."""

    def view(fn: Callable[[Any], Any]) -> Callable[[], Any]:
        def read() -> Any:
            with store.snapshot() as v:
                return fn(v)
        return read

    def export() -> Any:
        target = Path(store.path).parent / f"export-{os.getpid()}.wsx"
        if target.exists():
            target.unlink()
        return engine.export_file(store, target, prefix=key)

    return {
        "get": lambda: store.get(key),
        "get_version": lambda: store.get_version(key),
        "get_versions": lambda: store.get_versions(key),
        "scan": lambda: list(store.scan(key)),
        "scan reversed": lambda: list(store.scan(reverse=True)),
        "keys": lambda: store.keys(),
        "view.get": view(lambda v: v.get(key)),
        "view.get_version": view(lambda v: v.get_version(key)),
        "view.get_versions": view(lambda v: v.get_versions(key)),
        "view.scan": view(lambda v: v.scan()),
        # what sync's bootstrap and export read
        "iter_siblings": lambda: list(store.iter_siblings()),
        "export": export,
        # a write reads the key's siblings first (its version vector)
        "put": lambda: store.put(key, "new"),
    }


# -- reads refuse a damaged entry --------------------------------------------------------


def test_a_changed_value_byte_is_refused_on_every_read_path_never_served(
        tmp_path: Path) -> None:
    """The minimal case: put("k", 5), close, change the CBOR byte that encodes 5 to 7."""
    path = tmp_path / "s"
    with Store.open(path) as store:
        store.put("k", 5)
        store.put("other", 1)
    data_file = path / "snapshot" / "data.mdb"
    _replace_every(data_file, _cbor_entry_head(5), _cbor_entry_head(7))
    with Store.open(path) as store:
        assert store.get("other") == 1
        for name, read in _every_read(store, "k").items():
            with pytest.raises(CorruptionError) as excinfo:
                read()
            text = str(excinfo.value)
            assert "'k'" in text, (name, text)
            assert str(data_file) in text, (name, text)
            assert "walsync repair" in excinfo.value.hint, name
    report = engine.verify(path)
    assert not report.ok
    assert any("'k'" in d.message and d.path == str(data_file) for d in report.damage)
    result = cli("get", "-s", str(path), "k")
    assert result.exit_code == EXIT_DAMAGE
    assert "'k'" in result.stderr
    assert "hint:" in result.stderr
    assert cli("verify", "-s", str(path)).exit_code == EXIT_DAMAGE

    repaired = engine.repair(path)
    assert repaired.damaged
    assert repaired.snapshot_rebuilt
    assert repaired.lost_keys == []
    assert engine.verify(path).ok
    with Store.open(path) as store:
        assert store.get("k") == 5
        assert dict(store.scan()) == {"k": 5, "other": 1}


_ONE_SIBLING = Version("n", 1, 1, {"n": 1}, 0, False)
#: entries whose seal holds (they were written so) but which do not decode
_UNDECODABLE = {
    "truncated": b"\x81\x87\x41",  # cbor2 raises CBORDecodeEOF
    "garbage": b"\xff\xfe\xfd",
    "not an entry": cbor2.dumps({"a": 1}),
    "deep": b"\x81" * 5000,  # nested past what cbor2 reads
}
#: entries whose siblings decode but whose value does not
_BAD_VALUE = {
    "value does not decode": encode_entry([Sibling(_ONE_SIBLING, 0, b"\x9f\x01")]),
    "unknown codec": encode_entry([Sibling(_ONE_SIBLING, 9, cbor2.dumps(1))]),
}
#: (an export carries a value's stored bytes as they are, and sync ships them so)
_VALUE_READS = {"get", "get_versions", "scan", "scan reversed", "view.get",
                "view.get_versions", "view.scan"}


@pytest.mark.parametrize("kind", [*_UNDECODABLE, *_BAD_VALUE])
def test_entries_that_pass_their_seal_but_do_not_decode_raise_corruption_errors(
        tmp_path: Path, kind: str) -> None:
    """Never cbor2's CBORDecodeError / CBORDecodeEOF, nor anything else raw."""
    path = tmp_path / "s"
    entry = {**_UNDECODABLE, **_BAD_VALUE}[kind]
    with Store.open(path) as store:
        store.put("fine", 1)
        write_raw(store._snapshot, lambda writer: writer.put(b"bad", entry))
        for name, read in _every_read(store, "bad").items():
            if kind in _BAD_VALUE and name not in _VALUE_READS:
                if name != "put":  # (a put would replace it: its siblings decode)
                    read()  # the siblings decode: these need nothing more
                continue
            with pytest.raises(CorruptionError) as excinfo:
                read()
            text = str(excinfo.value)
            assert "'bad'" in text, (name, text)
            assert str(path / "snapshot" / "data.mdb") in text, (name, text)
    result = cli("get", "-s", str(path), "bad")
    assert result.exit_code == EXIT_DAMAGE, result.output
    assert "'bad'" in result.stderr


def test_lmdb_errors_of_a_damaged_tree_become_corruption_errors(tmp_path: Path) -> None:
    """A branch page pointing past the file: LMDB says MDB_PAGE_NOTFOUND."""
    path = tmp_path / "s"
    with Store.open(path) as store:
        for i in range(400):
            store.put(f"k/{i:04d}", {"i": i, "pad": "x" * 200})
    data_file = path / "snapshot" / "data.mdb"
    data = bytearray(data_file.read_bytes())
    psize = 4096
    branches = 0
    for page in range(len(data) // psize):
        at = page * psize
        if struct.unpack_from("<H", data, at + 10)[0] == 0x01:  # P_BRANCH
            node = struct.unpack_from("<H", data, at + 16)[0]  # its first node
            struct.pack_into("<HH", data, at + node, 0xFFFF, 0x0FFF)  # child page number
            branches += 1
    assert branches
    data_file.write_bytes(bytes(data))
    with Store.open(path) as store:
        with pytest.raises(CorruptionError, match=r"MDB_PAGE_NOTFOUND.*data\.mdb"):
            store.get("k/0000")
        with pytest.raises(CorruptionError, match="MDB_PAGE_NOTFOUND"):
            store.keys()
    assert not engine.verify(path).ok
    result = cli("scan", "-s", str(path))
    assert result.exit_code == EXIT_DAMAGE
    assert "Traceback" not in result.output


# -- the base copy -------------------------------------------------------------------------


def _store_with_base(path: Path) -> dict[str, Any]:
    """300 keys, a checkpoint (the base), then 100 of them rewritten above it."""
    state: dict[str, Any] = {}
    with Store.open(path, segment_bytes=65536) as store:
        for i in range(300):
            state[f"k/{i:04d}"] = {"i": i, "pad": "x" * 300}
            store.put(f"k/{i:04d}", state[f"k/{i:04d}"])
        store.checkpoint()
        for i in range(100):
            state[f"k/{i:04d}"] = {"i": -i}
            store.put(f"k/{i:04d}", state[f"k/{i:04d}"])
    assert json.loads((path / "snapshot-base" / "BASE").read_text())["lsn"] == 300
    return state


def test_a_damaged_base_is_found_by_verify_and_replaced_by_repair(tmp_path: Path) -> None:
    path = tmp_path / "s"
    state = _store_with_base(path)
    base_file = path / "snapshot-base" / "data.mdb"
    _replace_once(base_file, cbor2.dumps({"i": 250, "pad": "x" * 300})[:8],
                  cbor2.dumps({"i": 251, "pad": "x" * 300})[:8])
    with Store.open(path) as store:  # the snapshot is intact: reads never touch the base
        assert dict(store.scan()) == state
    report = engine.verify(path)
    assert not report.ok
    assert [d.path for d in report.damage] == [str(base_file)]
    assert "'k/0250'" in report.damage[0].message
    repaired = engine.repair(path)
    assert repaired.base_rewritten
    assert not repaired.snapshot_rebuilt
    assert engine.verify(path).ok


def test_a_rebuild_after_a_machine_crash_checks_the_base_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The base is damaged and the machine went down under the writer: open refuses
    (and leaves the snapshot where it is); repair takes the damaged value from the
    old snapshot, which the WAL proves unchanged since the base."""
    path = tmp_path / "s"
    state = _store_with_base(path)
    _replace_once(path / "snapshot-base" / "data.mdb",
                  cbor2.dumps({"i": 250, "pad": "x" * 300})[:8],
                  cbor2.dumps({"i": 251, "pad": "x" * 300})[:8])
    (path / "OPEN").write_text(json.dumps({"boot_id": "an-earlier-boot", "pid": 1}))
    monkeypatch.setattr(_fs, "boot_id", lambda: "this-boot")
    with pytest.raises(CorruptionError, match=r"base cannot be trusted.*'k/0250'"):
        Store.open(path)
    assert (path / "snapshot" / "data.mdb").exists()
    assert not (path / "quarantine").exists()
    repaired = engine.repair(path)
    assert repaired.snapshot_rebuilt
    assert repaired.base_rewritten
    assert repaired.lost_keys == []
    with Store.open(path) as store:
        assert dict(store.scan()) == state
    assert engine.verify(path).ok


def test_a_value_neither_copy_holds_intact_is_named_lost(tmp_path: Path) -> None:
    path = tmp_path / "s"
    state = _store_with_base(path)
    old = cbor2.dumps({"i": 250, "pad": "x" * 300})[:8]
    new = cbor2.dumps({"i": 251, "pad": "x" * 300})[:8]
    _replace_once(path / "snapshot-base" / "data.mdb", old, new)
    _replace_once(path / "snapshot" / "data.mdb", old, new)
    report = engine.verify(path)
    assert {d.path for d in report.damage} == {str(path / "snapshot" / "data.mdb"),
                                             str(path / "snapshot-base" / "data.mdb")}
    repaired = engine.repair(path)
    assert repaired.lost_keys == ["'k/0250'"]
    assert "walsync restore" in repaired.restore_hint
    result = cli("verify", "-s", str(path))
    assert result.exit_code == EXIT_OK, result.output
    with Store.open(path) as store:
        del state["k/0250"]
        assert dict(store.scan()) == state


@pytest.mark.parametrize("directory", ["snapshot", "snapshot-base"])
def test_a_file_cut_short_is_refused_not_a_fault(tmp_path: Path, directory: str) -> None:
    """LMDB maps the file: reading a page past its end would kill the process (SIGBUS)."""
    path = tmp_path / "s"
    state = _store_with_base(path)
    data_file = path / directory / "data.mdb"
    os.truncate(data_file, data_file.stat().st_size // 2)
    if directory == "snapshot":
        with pytest.raises(CorruptionError, match="cut short"):
            Store.open(path)
        with pytest.raises(CorruptionError, match="cut short"):
            Store.open(path, readonly=True)
    report = engine.verify(path)
    assert [d.path for d in report.damage] == [str(data_file)]
    assert "cut short" in report.damage[0].message
    repaired = engine.repair(path)
    assert repaired.lost_keys == []
    assert engine.verify(path).ok
    with Store.open(path) as store:
        assert dict(store.scan()) == state


def test_a_snapshot_older_than_its_base_with_no_wal_between_is_refused(tmp_path: Path) -> None:
    """LMDB falls back to an older transaction when its newest meta page is damaged.
    With the WAL gone up to the base, opening would hand out LSNs the base holds."""
    path = tmp_path / "s"
    with Store.open(path) as store:
        for i in range(5):
            store.put(f"k{i}", i)
    shutil.copytree(path / "snapshot", tmp_path / "older")  # holds LSN 5
    with Store.open(path) as store:
        for i in range(5, 10):
            store.put(f"k{i}", i)
        store.checkpoint()
    assert not list((path / "wal").glob("*.wal"))  # the close removed what the base holds
    shutil.rmtree(path / "snapshot")
    shutil.copytree(tmp_path / "older", path / "snapshot")
    with pytest.raises(LSNGapError, match="below its base copy's LSN 10"):
        Store.open(path)
    assert not engine.verify(path).ok
    repaired = engine.repair(path)
    assert repaired.snapshot_rebuilt
    assert repaired.lost_keys == []
    with Store.open(path) as store:
        assert dict(store.scan()) == {f"k{i}": i for i in range(10)}
        assert store.put("next", 1).lsn == 11


def test_a_large_value_applied_in_parts_is_sealed_whole(tmp_path: Path) -> None:
    path = tmp_path / "s"
    big = os.urandom(3 << 20)  # a large value: the entry stays in parts until applied
    with Store.open(path) as store:
        store.put("big", big)
        assert store.get("big") == big
    with Store.open(path) as store:
        assert store.get("big") == big
    assert engine.verify(path).ok


# -- format 1 (values without seals): sealed on the first writer's open -----------------


def _to_format_1(directory: Path) -> None:
    """Write the file as format 1 did: every value unsealed, no format entry."""
    env = lmdb.open(str(directory), max_dbs=8, lock=False)
    try:
        with env.begin(write=True) as txn:
            for name in (b"data", b"meta"):
                db = env.open_db(name, txn=txn, create=False)
                cur = txn.cursor(db=db)
                for key, value in list(cur):
                    if name == b"meta" and key == b"format":
                        cur.set_key(key)
                        cur.delete()
                        continue
                    entry = unseal(key, value)
                    assert entry is not None
                    txn.put(key, entry, db=db)
    finally:
        env.close()


@pytest.fixture
def format_1_store(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    path = tmp_path / "old"
    state = _store_with_base(path)
    with Store.open(path) as store:
        store.put("big", "walsync " * 20000)  # compressed, on overflow pages
        state["big"] = "walsync " * 20000
        store.set_retain_floor(7)
    _to_format_1(path / "snapshot")
    _to_format_1(path / "snapshot-base")
    info = json.loads((path / "snapshot-base" / "BASE").read_text())
    del info["snapshot_format"]
    (path / "snapshot-base" / "BASE").write_text(json.dumps(info))
    return path, state


def test_a_format_1_store_is_sealed_by_its_first_writer(
        format_1_store: tuple[Path, dict[str, Any]]) -> None:
    path, state = format_1_store
    with pytest.raises(FormatVersionError, match=r"version 1.*version 2"):
        Store.open(path, readonly=True)
    report = engine.verify(path)
    assert report.ok, report.damage
    assert any("format 1" in note for note in report.notes)
    with Store.open(path) as store:
        assert dict(store.scan()) == state
        assert store.retain_floor == 7
    info = json.loads((path / "snapshot-base" / "BASE").read_text())
    assert info["snapshot_format"] == SNAPSHOT_FORMAT_VERSION
    report = engine.verify(path)
    assert report.ok, report.damage
    assert not report.notes
    with Store.open(path, readonly=True) as store:
        assert dict(store.scan()) == state


def test_a_format_1_entry_that_does_not_decode_is_not_sealed_over(
        format_1_store: tuple[Path, dict[str, Any]]) -> None:
    path, _state = format_1_store
    env = lmdb.open(str(path / "snapshot"), max_dbs=8, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"k/0007", b"\xff\x00", db=env.open_db(b"data", txn=txn, create=False))
    env.close()
    with pytest.raises(CorruptionError, match=r"'k/0007'.*does not decode"):
        Store.open(path)
    with pytest.raises(CorruptionError, match="'k/0007'"):
        Store.open(path)  # still format 1: nothing was sealed
    assert not engine.verify(path).ok


# -- open, verify and repair apply one rule to a damaged end of the log ------------------


_CHILD = """
import sys
from walsync.engine import Store
with_close = sys.argv[2] == "close"
store = Store.open(sys.argv[1])
for i in range(5):
    store.put(f"k{i}", {"i": i, "pad": "p" * 80})
assert store.applied_lsn == 5  # waits for the applier: the snapshot holds all five
if with_close:
    store.close()
print("done", flush=True)
sys.stdin.read()
"""


def _five_records(path: Path, how: str) -> Path:
    """Five acknowledged records written by a child process that then closes the
    store cleanly or is killed with it open; the last segment."""
    with subprocess.Popen([sys.executable, "-c", _CHILD, str(path), how], cwd=REPO_ROOT,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "done"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (path / "OPEN").exists() == (how == "kill")
    segment = sorted((path / "wal").glob("*.wal"))[-1]
    size = segment.stat().st_size
    if how == "kill":  # the live segment's preallocated zeros: cut them as a close would
        data = segment.read_bytes().rstrip(b"\x00")
        size = len(data)
        segment.write_bytes(data)
    os.truncate(segment, size - 7)
    return segment


def test_after_a_clean_close_a_cut_last_record_is_damage_to_open_verify_and_repair(
        tmp_path: Path) -> None:
    path = tmp_path / "s"
    _five_records(path, "close")
    with pytest.raises(CorruptionError) as excinfo:
        Store.open(path)
    said = str(excinfo.value)
    del excinfo
    report = engine.verify(path)
    assert not report.ok
    assert report.torn_tail is None
    assert report.damage[0].message == said

    opened = cli("get", "-s", str(path), "k0")
    verified = cli("verify", "-s", str(path))
    assert opened.exit_code == verified.exit_code == EXIT_DAMAGE
    assert said in opened.stderr
    assert f"damage: {said}" in verified.stdout

    repaired = cli("repair", "-s", str(path), "--yes")
    assert repaired.exit_code == EXIT_OK
    assert repaired.stdout.startswith(f"damage: {said}")
    # the record is gone from the log; the snapshot held its effect, and keeps it
    assert "records whose effects are gone from the store: 0" in repaired.stdout
    with Store.open(path) as store:
        assert store.keys() == ["k0", "k1", "k2", "k3", "k4"]
    assert cli("verify", "-s", str(path)).exit_code == EXIT_OK
    assert engine.repair(path).message == "no damage found"


def test_after_a_crash_a_cut_last_record_is_a_torn_tail_to_open_verify_and_repair(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s"
    _five_records(path, "kill")
    report = engine.verify(path)
    assert report.ok
    assert report.torn_tail is not None
    said = describe_torn_tail(report.torn_tail)
    assert "never acknowledged" in said

    verified = cli("verify", "-s", str(path))
    assert verified.exit_code == EXIT_OK
    assert said in verified.stdout
    repaired = engine.repair(path)
    assert not repaired.damaged
    assert repaired.message == f"no damage found; {said}"

    with caplog.at_level(logging.WARNING, logger="walsync.replay"), Store.open(path) as store:
        assert store.recovery is not None
        assert store.recovery.torn_tail == report.torn_tail
        # the snapshot had applied the cut record (the kernel kept its pages)
        assert store.keys() == ["k0", "k1", "k2", "k3", "k4"]
    assert said in caplog.text
    assert cli("get", "-s", str(path), "k3").exit_code == EXIT_OK
    assert engine.verify(path).ok


@pytest.fixture(autouse=True)
def _no_exports_left(tmp_path: Path) -> Iterator[None]:
    yield
    for leftover in tmp_path.glob("export-*.wsx"):
        leftover.unlink()
