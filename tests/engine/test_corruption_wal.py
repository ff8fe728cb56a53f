"""Corruption of WAL segments: every byte flip and truncation is detected, nothing
acknowledged changes silently, and damage before the tail is refused and repairable.

One small pristine store (three segments, about 9 KiB, segments kept by a
retain floor, closed cleanly) is built per module; each case works on a copy.
The byte-flip sweeps flip bytes in place in one working copy and run the
read-only ``verify``; only the cases ``verify`` accepts (a torn tail) are
opened, on a fresh copy.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import xxhash

from walsync import engine
from walsync.engine import CorruptionError, FormatVersionError, LSNGapError, Store
from walsync.engine.layout import StoreLayout
from walsync.engine.record import SEGMENT_HEADER_BYTES, decode_frame
from walsync.engine.wal import TornTail

SEGMENT_BYTES = 4096


@dataclass(frozen=True)
class FrameInfo:
    segment: str  # file name
    offset: int
    size: int
    lsn: int

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass
class Pristine:
    path: Path
    #: lsn -> {key: value or None (delete)} of that commit
    records: dict[int, dict[str, Any]]
    segments: list[str]  # file names, log order
    frames: list[FrameInfo]

    @property
    def last_lsn(self) -> int:
        return max(self.records)

    def frames_of(self, segment: str) -> list[FrameInfo]:
        return [f for f in self.frames if f.segment == segment]

    def state_after(self, lsn: int) -> dict[str, Any]:
        """The live keys after every record up to ``lsn``."""
        state: dict[str, Any] = {}
        for n in sorted(self.records):
            if n > lsn:
                break
            for key, value in self.records[n].items():
                if value is None:
                    state.pop(key, None)
                else:
                    state[key] = value
        return state


def _frames(path: Path) -> list[FrameInfo]:
    data = path.read_bytes()
    out = []
    offset = SEGMENT_HEADER_BYTES
    while offset < len(data):
        if not any(data[offset:]):
            break  # the open store's preallocated space, not written yet
        _status, frame = decode_frame(data, offset)
        assert frame is not None, f"pristine segment {path} does not decode at {offset}"
        out.append(FrameInfo(path.name, offset, frame.size, frame.lsn))
        offset += frame.size
    return out


def _build(path: Path) -> Pristine:
    records: dict[int, dict[str, Any]] = {}
    with Store.open(path, segment_bytes=SEGMENT_BYTES) as store:
        store.set_retain_floor(1)
        i = 0
        while True:
            key = f"k{i % 9}"
            if i % 11 == 5:
                lsn = store.delete(key).lsn
                records[lsn] = {key: None}
            elif i % 7 == 3:
                ops = {f"b{i % 4}/{j}": {"i": i, "j": j} for j in range(3)}
                with store.batch() as b:
                    for k, v in ops.items():
                        b.put(k, v)
                assert b.result is not None
                records[b.result.lsn] = dict(ops)
            else:
                value = {"i": i, "pad": "v" * (60 + i % 50)}
                records[store.put(key, value).lsn] = {key: value}
            i += 1
            segments = StoreLayout(path).list_segments()
            if len(segments) == 3 and len(_frames(segments[-1][1])) >= 4:
                break
    segments = StoreLayout(path).list_segments()
    frames = [f for _, p in segments for f in _frames(p)]
    assert [f.lsn for f in frames] == sorted(records), "the pristine WAL lacks records"
    return Pristine(path, records, [p.name for _, p in segments], frames)


@pytest.fixture(autouse=True)
def writer_died(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read every working copy as a store whose writer died with it open (the OPEN
    marker left behind), the one case where a damaged last record may be a torn
    tail; each open and close of a copy would otherwise clear the marker. A
    cleanly closed store is stricter still (test_corruption_large.py)."""
    monkeypatch.setattr(StoreLayout, "closed_cleanly", lambda self: False)


@pytest.fixture
def no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip fsyncs for tests that open a store hundreds of times: what they check is
    how damage is read back, which syncing does not change."""
    from walsync.engine import _fs
    from walsync.engine.snapshot import SnapshotStore

    for name in ("fsync", "fdatasync", "fsync_dir"):
        monkeypatch.setattr(_fs, name, lambda *_: None)
    monkeypatch.setattr(SnapshotStore, "sync", lambda self: None)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    return _build(tmp_path_factory.mktemp("pristine") / "store")


def _copy(pristine: Pristine, dest: Path) -> Path:
    shutil.copytree(pristine.path, dest)
    return dest


def _wal(path: Path, name: str) -> Path:
    return path / "wal" / name


def _live(store: Store) -> dict[str, Any]:
    return dict(store.scan())


def _names_place(exc: CorruptionError, path: Path, offset: int, lsn: int) -> None:
    text = str(exc)
    assert exc.path == str(path), text
    assert exc.offset == offset, text
    assert exc.lsn == lsn, text
    assert str(path) in text
    assert f"offset {offset}" in text
    assert f"LSN {lsn}" in text


def test_corruption_pristine_store_is_three_small_segments(pristine: Pristine) -> None:
    sizes = [_wal(pristine.path, n).stat().st_size for n in pristine.segments]
    assert len(sizes) == 3
    assert 6 * 1024 <= sum(sizes) <= 10 * 1024
    report = engine.verify(pristine.path)
    assert report.ok
    assert report.torn_tail is None
    assert report.records == len(pristine.records)


# -- every single-byte flip ------------------------------------------------------


def _sweep(pristine: Pristine, work: Path, mask: int, offsets: dict[str, list[int]]) -> int:
    """Flip ``mask`` into each offset of each segment of ``work`` in turn (in place,
    restored after each case) and check it is detected. Returns the torn-tail cases."""
    last_name = pristine.segments[-1]
    last_frame = pristine.frames[-1]
    expected = pristine.state_after(pristine.last_lsn)
    store_file = (work / "STORE").read_bytes()
    torn_cases = 0
    for name, where_list in offsets.items():
        seg = _wal(work, name)
        original = seg.read_bytes()
        fd = os.open(seg, os.O_RDWR)
        try:
            for offset in where_list:
                os.pwrite(fd, bytes([original[offset] ^ mask]), offset)
                report = engine.verify(work)
                where = f"flip ^{mask:#04x} at {name}+{offset}"
                if not report.ok:
                    assert report.damage[0].path == str(seg), f"{where}: {report.damage}"
                    if name == last_name:
                        # in the segment open replays: open refuses it too, changing nothing
                        with pytest.raises(CorruptionError, match=re.escape(str(seg))):
                            Store.open(work).close()
                    os.pwrite(fd, original[offset : offset + 1], offset)
                    continue
                # Accepted by verify: only as a torn tail, and only the last record.
                torn = report.torn_tail
                assert torn is not None, f"{where}: not detected at all"
                assert torn.segment == str(seg), f"{where}: {torn}"
                assert name == last_name, f"{where}: a torn tail in a sealed segment"
                assert torn.offset == last_frame.offset, f"{where}: tail cut too early: {torn}"
                assert torn.first_lost_lsn == last_frame.lsn, f"{where}: {torn}"
                assert offset >= last_frame.offset, f"{where}: damage before the cut: {torn}"
                torn_cases += 1
                if torn_cases % 16 != 1 and offset != len(original) - 1:
                    # the same torn tail as the case opened before it: verify's word is
                    # enough (opening costs a few fsyncs)
                    os.pwrite(fd, original[offset : offset + 1], offset)
                    continue
                with Store.open(work) as store:
                    assert store.recovery is not None
                    assert store.recovery.torn_tail == torn, where
                    assert _live(store) == expected, f"{where}: acknowledged data changed"
                # undo what open did: the cut tail and the hole it recorded
                os.ftruncate(fd, 0)
                os.pwrite(fd, original, 0)
                (work / "STORE").write_bytes(store_file)
        finally:
            os.close(fd)
        assert seg.read_bytes() == original
    return torn_cases


@pytest.mark.parametrize("mask", [0xFF, 0x01, 0x80, 0x5A])
def test_corruption_every_byte_flip_is_detected(
    pristine: Pristine, tmp_path: Path, mask: int
) -> None:
    """Every byte of every segment, xor ``mask``: verify or open reports damage, or
    (only within the last record of the last segment) open cuts a torn tail."""
    work = _copy(pristine, tmp_path / "work")
    offsets = {n: list(range(_wal(work, n).stat().st_size)) for n in pristine.segments}
    assert sum(len(v) for v in offsets.values()) >= 6 * 1024
    torn = _sweep(pristine, work, mask, offsets)
    # every byte of the last record can only be a torn tail (no later frame vouches)
    assert torn == pristine.frames[-1].size


# -- every truncation --------------------------------------------------------------


@pytest.mark.usefixtures("no_fsync")
def test_corruption_truncating_the_last_segment_cuts_the_tail(
    pristine: Pristine, tmp_path: Path
) -> None:
    """Snapshot removed, so state comes from the WAL alone: records before the cut are
    there, records after it are not, and the cut is reported unless it falls on a
    frame boundary."""
    work = _copy(pristine, tmp_path / "work")
    last = _wal(work, pristine.segments[-1])
    original = last.read_bytes()
    store_file = (work / "STORE").read_bytes()
    frames = pristine.frames_of(last.name)
    boundaries = {SEGMENT_HEADER_BYTES} | {f.end for f in frames}
    first_in_last = frames[0].lsn
    for cut in range(len(original)):
        # rewrite in place (open may have cut or removed the file): no truncation to
        # zero, which ext4 answers with a flush on close
        fd = os.open(last, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, original[:cut], 0)
            os.ftruncate(fd, cut)
        finally:
            os.close(fd)
        # the base copy too: it holds records the cut removes from the log
        shutil.rmtree(work / "snapshot", ignore_errors=True)
        shutil.rmtree(work / "snapshot-base", ignore_errors=True)
        if (work / "STORE").read_bytes() != store_file:
            (work / "STORE").write_bytes(store_file)
        kept = [f for f in frames if f.end <= cut]
        last_kept = kept[-1].lsn if kept else first_in_last - 1
        with Store.open(work) as store:
            store.set_retain_floor(1)  # the snapshot is new: keep the segments on close
            recovery = store.recovery
            assert recovery is not None
            if cut in boundaries:
                assert recovery.torn_tail is None, f"cut at frame boundary {cut}"
            else:
                torn = recovery.torn_tail
                assert torn is not None, f"cut at {cut} not reported"
                assert torn.first_lost_lsn == last_kept + 1
                assert torn.offset == (kept[-1].end if kept else
                                       (SEGMENT_HEADER_BYTES if cut >= SEGMENT_HEADER_BYTES
                                        else 0))
            assert _live(store) == pristine.state_after(last_kept), f"cut at {cut}"
            assert store.next_lsn == last_kept + 1
        report = engine.verify(work)
        assert report.ok, f"cut at {cut}: {report.damage}"
        assert report.torn_tail is None, f"cut at {cut}: tail still there"


def test_corruption_truncating_the_last_segment_keeps_snapshot_data(
    pristine: Pristine, tmp_path: Path
) -> None:
    """With the snapshot intact (clean close), a cut tail loses nothing from the state;
    the LSNs the WAL lost are recorded as a hole so verify stays ok."""
    last_frame = pristine.frames[-1]
    for cut in (last_frame.offset + 1, last_frame.offset + 20, last_frame.end - 1):
        work = _copy(pristine, tmp_path / f"cut{cut}")
        last = _wal(work, pristine.segments[-1])
        last.write_bytes(last.read_bytes()[:cut])
        with Store.open(work) as store:
            assert store.recovery is not None
            assert store.recovery.torn_tail is not None
            assert store.recovery.wal_hole == (last_frame.lsn, last_frame.lsn)
            assert _live(store) == pristine.state_after(pristine.last_lsn)
            assert store.put("after", 1).lsn == pristine.last_lsn + 1
        assert engine.verify(work).ok


def test_corruption_every_truncation_of_a_sealed_segment_is_detected(
    pristine: Pristine, tmp_path: Path
) -> None:
    work = _copy(pristine, tmp_path / "work")
    for name in pristine.segments[:-1]:
        seg = _wal(work, name)
        original = seg.read_bytes()
        fd = os.open(seg, os.O_RDWR)
        try:
            for cut in range(len(original)):
                os.ftruncate(fd, cut)
                report = engine.verify(work)
                assert not report.ok, f"{name} cut at {cut} not detected"
                os.pwrite(fd, original[cut:], cut)
        finally:
            os.close(fd)
        assert seg.read_bytes() == original
    assert engine.verify(work).ok


# -- damage before the tail: refused, then repaired -----------------------------------


def _remove_snapshot(path: Path) -> None:
    shutil.rmtree(path / "snapshot")


def _stale_snapshot(pristine: Pristine, path: Path, tmp_path: Path) -> int:
    """Give ``path`` the snapshot of an earlier moment (as a power loss could leave an
    unsynced LMDB): rebuild one holding only the first segment's records."""
    first = pristine.frames_of(pristine.segments[0])
    upto = first[-1].lsn
    scratch = tmp_path / "stale"
    shutil.copytree(pristine.path, scratch)
    for name in pristine.segments[1:]:
        _wal(scratch, name).unlink()
    _remove_snapshot(scratch)
    with Store.open(scratch) as store:
        assert store.applied_lsn == upto
        store.set_retain_floor(1)
    _remove_snapshot(path)
    shutil.copytree(scratch / "snapshot", path / "snapshot")
    shutil.rmtree(scratch)
    return upto


def _damaged_store(pristine: Pristine, tmp_path: Path, snapshot: str) -> tuple[Path, int]:
    """A copy of the store whose snapshot replays from before segment 2; returns the
    path and the snapshot's applied LSN. Without the base copy, which holds every
    record: these cases are about the log's repair (a base that outlives damage to
    the log is in test_snapshot_checksums.py)."""
    work = _copy(pristine, tmp_path / "store")
    shutil.rmtree(work / "snapshot-base")
    if snapshot == "deleted":
        _remove_snapshot(work)
        return work, 0
    return work, _stale_snapshot(pristine, work, tmp_path)


def _check_repaired(
    pristine: Pristine, work: Path, first_lost: int, last_lost_at_least: int,
    report: engine.RepairReport, applied: int,
) -> None:
    assert report.damaged
    assert report.first_lost_lsn == first_lost
    assert report.last_lost_lsn is not None
    assert report.last_lost_lsn >= last_lost_at_least
    assert report.records_lost_from_state == report.last_lost_lsn - max(applied, first_lost - 1)
    assert report.quarantine is not None
    assert Path(report.quarantine).is_dir()
    assert Path(report.quarantine).parent == work / "quarantine"
    with Store.open(work) as store:
        assert _live(store) == pristine.state_after(first_lost - 1)
        new = store.put("after-repair", {"ok": True}).lsn
        assert new > report.last_lost_lsn
        assert new > pristine.last_lsn
    after = engine.verify(work)
    assert after.ok, after.damage
    assert after.torn_tail is None
    with Store.open(work) as store:
        assert store.get("after-repair") == {"ok": True}
        assert store.next_lsn == new + 1


@pytest.mark.parametrize("snapshot", ["deleted", "stale"])
def test_corruption_flip_in_sealed_segment_is_refused_then_repaired(
    pristine: Pristine, tmp_path: Path, snapshot: str
) -> None:
    work, applied = _damaged_store(pristine, tmp_path, snapshot)
    name = pristine.segments[1]
    frame = pristine.frames_of(name)[3]
    seg = _wal(work, name)
    data = bytearray(seg.read_bytes())
    data[frame.offset + 40] ^= 0xFF  # inside the payload
    seg.write_bytes(bytes(data))
    damaged = bytes(data)
    later = {n: _wal(work, n).read_bytes() for n in pristine.segments[2:]}

    with pytest.raises(CorruptionError) as excinfo:
        Store.open(work)
    _names_place(excinfo.value, seg, frame.offset, frame.lsn)
    verify = engine.verify(work)
    assert not verify.ok
    assert (verify.damage[0].path, verify.damage[0].offset, verify.damage[0].lsn) == (
        str(seg), frame.offset, frame.lsn)

    report = engine.repair(work)
    del excinfo  # the failed open's traceback must not matter to repair either
    assert report.segment == name
    assert report.offset == frame.offset
    assert report.moved == pristine.segments[1:]
    quarantine = Path(report.quarantine or "")
    assert (quarantine / name).read_bytes() == damaged
    for n, content in later.items():
        assert (quarantine / n).read_bytes() == content
        assert not _wal(work, n).exists()
    assert seg.stat().st_size == frame.offset
    _check_repaired(pristine, work, frame.lsn, pristine.last_lsn, report, applied)
    assert (quarantine / name).read_bytes() == damaged  # repair and reopening kept it


def test_corruption_repair_right_after_a_refused_open(
    pristine: Pristine, tmp_path: Path
) -> None:
    """The usual pattern: catch the CorruptionError of open and repair in the handler."""
    work, applied = _damaged_store(pristine, tmp_path, "deleted")
    name = pristine.segments[1]
    frame = pristine.frames_of(name)[0]
    seg = _wal(work, name)
    data = bytearray(seg.read_bytes())
    data[frame.offset] ^= 0x01  # the checksum itself
    seg.write_bytes(bytes(data))
    try:
        Store.open(work)
    except CorruptionError:
        report = engine.repair(work)
    else:
        pytest.fail("open accepted a damaged sealed segment in its replay range")
    _check_repaired(pristine, work, frame.lsn, pristine.last_lsn, report, applied)


@pytest.mark.parametrize("snapshot", ["deleted", "stale"])
def test_corruption_deleted_middle_segment_is_refused_then_repaired(
    pristine: Pristine, tmp_path: Path, snapshot: str
) -> None:
    work, applied = _damaged_store(pristine, tmp_path, snapshot)
    middle, last = pristine.segments[1], pristine.segments[2]
    first_missing = pristine.frames_of(middle)[0].lsn
    _wal(work, middle).unlink()
    last_bytes = _wal(work, last).read_bytes()

    with pytest.raises(LSNGapError) as excinfo:
        Store.open(work)
    _names_place(excinfo.value, _wal(work, last), 0, first_missing)
    verify = engine.verify(work)
    assert not verify.ok
    assert verify.damage[0].lsn == first_missing

    report = engine.repair(work)
    assert report.moved == [last]
    assert (Path(report.quarantine or "") / last).read_bytes() == last_bytes
    _check_repaired(pristine, work, first_missing, pristine.last_lsn, report, applied)


def _patch_frame(data: bytearray, offset: int, *, lsn: int | None = None,
                 version: int | None = None) -> None:
    """Rewrite a frame's LSN or version field and fix its checksum (intact, but wrong)."""
    if lsn is not None:
        struct.pack_into("<Q", data, offset + 16, lsn)
    if version is not None:
        data[offset + 10] = version
    length = struct.unpack_from("<I", data, offset + 12)[0]
    body = bytes(data[offset + 8 : offset + 32 + length])
    struct.pack_into("<Q", data, offset, xxhash.xxh3_64_intdigest(body))


@pytest.mark.parametrize("snapshot", ["deleted", "stale"])
def test_corruption_frame_with_wrong_lsn_is_refused_then_repaired(
    pristine: Pristine, tmp_path: Path, snapshot: str
) -> None:
    work, applied = _damaged_store(pristine, tmp_path, snapshot)
    name = pristine.segments[1]
    frame = pristine.frames_of(name)[2]
    seg = _wal(work, name)
    data = bytearray(seg.read_bytes())
    wrong = frame.lsn + 1000
    _patch_frame(data, frame.offset, lsn=wrong)
    seg.write_bytes(bytes(data))

    with pytest.raises(LSNGapError) as excinfo:
        Store.open(work)
    _names_place(excinfo.value, seg, frame.offset, frame.lsn)
    assert f"found LSN {wrong}" in str(excinfo.value)
    assert not engine.verify(work).ok

    report = engine.repair(work)
    # the wrong LSN was seen in the quarantined bytes: it is never handed out either
    assert report.last_lost_lsn == wrong
    _check_repaired(pristine, work, frame.lsn, wrong, report, applied)


def test_corruption_wrong_lsn_in_last_segment_is_refused_with_snapshot_intact(
    pristine: Pristine, tmp_path: Path
) -> None:
    """An intact frame with the wrong LSN is never a torn tail, even at the very end."""
    work = _copy(pristine, tmp_path / "store")
    last = pristine.frames[-1]
    seg = _wal(work, last.segment)
    data = bytearray(seg.read_bytes())
    _patch_frame(data, last.offset, lsn=last.lsn + 1)
    seg.write_bytes(bytes(data))
    with pytest.raises(LSNGapError) as excinfo:
        Store.open(work)
    _names_place(excinfo.value, seg, last.offset, last.lsn)


def test_corruption_damaged_header_of_sealed_segment_names_file_offset_and_lsn(
    pristine: Pristine, tmp_path: Path
) -> None:
    work, _applied = _damaged_store(pristine, tmp_path, "deleted")
    name = pristine.segments[1]
    seg = _wal(work, name)
    data = bytearray(seg.read_bytes())
    data[3] ^= 0xFF  # the magic
    seg.write_bytes(bytes(data))
    first = pristine.frames_of(name)[0].lsn
    with pytest.raises(CorruptionError) as excinfo:
        Store.open(work)
    _names_place(excinfo.value, seg, 0, first)
    report = engine.repair(work)
    assert report.first_lost_lsn == first
    assert (Path(report.quarantine or "") / name).read_bytes() == bytes(data)


def test_corruption_second_repair_in_the_same_second_gets_its_own_quarantine(
    pristine: Pristine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fixed = time.gmtime(1_800_000_000)
    clock = SimpleNamespace(strftime=time.strftime, gmtime=lambda *_: fixed)
    monkeypatch.setattr(importlib.import_module("walsync.engine.layout"), "time", clock)
    work, _applied = _damaged_store(pristine, tmp_path, "deleted")
    seg3 = _wal(work, pristine.segments[2])
    seg3_bytes = seg3.read_bytes()
    _wal(work, pristine.segments[1]).unlink()
    first = engine.repair(work)
    assert first.moved == [pristine.segments[2]]
    # new damage after the first repair: a middle segment goes missing again
    with Store.open(work, segment_bytes=SEGMENT_BYTES) as store:
        store.set_retain_floor(1)
        for i in range(80):
            store.put(f"n{i % 5}", "w" * 100)
    segments = StoreLayout(work).list_segments()
    assert len(segments) >= 4
    victim = segments[-2][1]
    victim.unlink()
    second = engine.repair(work)
    assert second.damaged
    assert second.quarantine != first.quarantine
    assert (Path(first.quarantine or "") / seg3.name).read_bytes() == seg3_bytes
    assert (Path(second.quarantine or "") / segments[-1][1].name).exists()
    with Store.open(work):
        pass
    assert engine.verify(work).ok


# -- another format version -------------------------------------------------------------


def test_corruption_segment_of_future_format_version_is_refused_naming_both(
    pristine: Pristine, tmp_path: Path
) -> None:
    work = _copy(pristine, tmp_path / "store")
    seg = _wal(work, pristine.segments[-1])
    data = bytearray(seg.read_bytes())
    struct.pack_into("<H", data, 8, 2)
    struct.pack_into("<Q", data, 24, xxhash.xxh3_64_intdigest(bytes(data[:24])))
    seg.write_bytes(bytes(data))
    with pytest.raises(FormatVersionError) as excinfo:
        Store.open(work)
    text = str(excinfo.value)
    assert "version 2" in text
    assert "version 1" in text
    assert str(seg) in text
    report = engine.verify(work)
    assert not report.ok
    assert "version 2" in report.damage[0].message
    del excinfo
    before = sorted(os.listdir(work / "wal"))
    with pytest.raises(FormatVersionError):
        engine.repair(work)
    assert sorted(os.listdir(work / "wal")) == before
    assert seg.read_bytes() == bytes(data)
    assert not (work / "quarantine").exists() or not any((work / "quarantine").iterdir())


def test_corruption_frame_of_future_format_version_is_refused_naming_both(
    pristine: Pristine, tmp_path: Path
) -> None:
    work = _copy(pristine, tmp_path / "store")
    last = pristine.frames[-1]
    seg = _wal(work, last.segment)
    data = bytearray(seg.read_bytes())
    _patch_frame(data, last.offset, version=2)
    seg.write_bytes(bytes(data))
    with pytest.raises(FormatVersionError) as excinfo:
        Store.open(work)
    text = str(excinfo.value)
    assert "version 2" in text
    assert "version 1" in text
    assert excinfo.value.lsn == last.lsn


# -- the synced LSN of frames written after a rotation ----------------------------------


def test_corruption_unsynced_frames_after_rotation_are_a_torn_tail(tmp_path: Path) -> None:
    """With durability 'none', nothing after a rotation was fdatasynced: losing those
    bytes (a power loss) is a torn tail, and no later frame may vouch for them."""
    path = tmp_path / "store"
    with Store.open(path, segment_bytes=SEGMENT_BYTES, durability="none") as store:
        store.set_retain_floor(1)
        i = 0
        while len(StoreLayout(path).list_segments()) < 2:
            store.put(f"k{i}", "x" * 200)
            i += 1
        first_new = StoreLayout(path).list_segments()[-1][0]
        store.put("later-1", 1)
        store.put("later-2", 2)
    seg = StoreLayout(path).list_segments()[-1][1]
    frames = _frames(seg)
    assert frames[0].lsn == first_new
    data = bytearray(seg.read_bytes())
    for info in frames:
        _status, frame = decode_frame(data, info.offset)
        assert frame is not None
        assert frame.synced_lsn < first_new, (
            f"frame {frame.lsn} claims LSN {frame.synced_lsn} was synced; only LSNs "
            f"below {first_new} were"
        )
    # a power loss that dropped the page of the first frame only
    data[frames[0].offset : frames[0].end] = bytes(frames[0].size)
    seg.write_bytes(bytes(data))
    shutil.rmtree(path / "snapshot")
    with Store.open(path) as store:
        assert store.recovery is not None
        torn = store.recovery.torn_tail
        assert isinstance(torn, TornTail)
        assert torn.first_lost_lsn == first_new
        assert torn.intact_frames_cut == len(frames) - 1
        assert store.get("k0") == "x" * 200
        assert store.get("later-1") is None


# -- a repair that stops half way ---------------------------------------------------------


class _Stop(Exception):
    """Stands for a crash at one step of repair (nothing after it runs)."""


@pytest.mark.parametrize("damage", ["flip", "missing"])
@pytest.mark.parametrize("step", ["write_store_file", "rename", "truncate"])
def test_corruption_repair_stopped_at_any_step_never_reuses_lsns(
    pristine: Pristine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str,
    step: str,
) -> None:
    """Stop repair at each call of each of its steps in turn. Whatever it managed, the
    store either still refuses to open (and a second repair finishes the job) or opens
    with exactly the records before the damage; either way no LSN seen in the damaged
    log is ever handed out again, and verify stays ok."""
    repair_module = importlib.import_module("walsync.engine.repair")
    owner: Any = repair_module if step == "write_store_file" else repair_module._fs
    real = getattr(owner, step)
    stopped_any = False
    for stop_at in range(1, 4):
        case = tmp_path / f"{stop_at}"
        case.mkdir()
        work, _applied = _damaged_store(pristine, case, "deleted")
        middle = pristine.segments[1]
        if damage == "flip":
            frame = pristine.frames_of(middle)[2]
            seg = _wal(work, middle)
            data = bytearray(seg.read_bytes())
            data[frame.end - 1] ^= 0x10
            seg.write_bytes(bytes(data))
            first_lost = frame.lsn
        else:
            _wal(work, middle).unlink()
            first_lost = pristine.frames_of(middle)[0].lsn
        calls = {"n": 0}

        def stopping(*args: Any, _at: int = stop_at, _real: Any = real,
                     _calls: dict[str, int] = calls) -> Any:
            _calls["n"] += 1
            if _calls["n"] == _at:
                raise _Stop(step)
            return _real(*args)

        monkeypatch.setattr(owner, step, stopping)
        try:
            engine.repair(work)
            stopped = False
        except _Stop:
            stopped = True
        monkeypatch.setattr(owner, step, real)
        stopped_any = stopped_any or stopped
        where = f"{damage}: repair stopped at {step} call {stop_at}"
        try:
            store = Store.open(work)
        except CorruptionError:
            assert stopped, f"{where}: a finished repair left a store that does not open"
            assert engine.repair(work).damaged
            store = Store.open(work)
        with store:
            assert _live(store) == pristine.state_after(first_lost - 1), where
            new = store.put("after", 1).lsn
            assert new > pristine.last_lsn, f"{where}: LSN {new} handed out again"
        report = engine.verify(work)
        assert report.ok, f"{where}: {report.damage}"
        with Store.open(work) as store:
            assert store.get("after") == 1
    if step != "truncate" or damage == "flip":
        assert stopped_any, f"repair never reached {step}"
