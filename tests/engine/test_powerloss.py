"""Simulated power loss: every crash state a weak filesystem allows recovers.

A one-thread workload (store creation, commits of both durabilities across
segment rotations, a checkpoint that removes segments, a clean close, a
reopen, a compaction, a clean close) runs under the recorder of
``tests/engine/_fstrace.py``. At every point of its trace the crash states
the trace allows (unsynced bytes dropped, torn,
zeroed, garbage or partly written; creates, renames and unlinks lost until
their directory was synced) are written into fresh directories, and each one
must open: a correct disk can produce all of them, so a refusal is a defect.
What the store then holds must be the state after some prefix of the commits
(by LSN), at its applied LSN, containing every commit acknowledged as durable
before the crash; after a close, ``verify`` finds nothing wrong.

Two planted bugs show that the checker bites: acknowledging a commit before
its fdatasync loses an acknowledged commit in some state, and a frame scanner
that skips the checksum takes unsynced garbage for data.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.crash.summary import KillSummary
from tests.engine._faults import apply_ops
from tests.engine._fstrace import (
    Ack,
    CrashState,
    DirSync,
    Event,
    FsRecorder,
    Intent,
    LiveSnapshot,
    Unlink,
    crash_state,
    crash_states,
    materialize,
)
from walsync import engine
from walsync.engine import Delete, Put, Store, _fs, wal
from walsync.engine.record import (
    _FRAME_HEADER,
    FRAME_HEADER_BYTES,
    FRAME_MAGIC,
    MAX_PAYLOAD_BYTES,
    Frame,
    FrameStatus,
)

SEGMENT_BYTES = 4096
SEED = 20261123
#: the CI bar for distinct power-loss states checked (the campaign counts them)
MIN_STATES = 150

Ops = list[Put | Delete]


def _pad(i: int, n: int) -> bytes:
    """Bytes unique to commit ``i``: garbage taken for data shows up in a value."""
    return bytes((i * 31 + j * 7) % 251 for j in range(n))


def _ops(i: int) -> Ops:
    """Commit ``i``: every one changes what a reader sees, so a state names its prefix."""
    if i % 5 == 4:
        return [Put(f"b{j}", {"i": i, "j": j, "pad": _pad(i + j, 150)}) for j in range(3)]
    if i % 7 == 6:
        return [Delete(f"k{(i - 1) % 3}")]
    return [Put(f"k{i % 3}", {"i": i, "pad": _pad(i, 500 + 40 * (i % 4))})]


def _durability(i: int) -> str:
    # some 'none' commits: unsynced frames that a later fdatasync or a seal covers
    return "none" if i % 4 == 1 else "local"



#: commits per phase; after each phase: a checkpoint, a clean close (never
#: compacted: LMDB's own file is still the one it created), a reopen and a
#: compaction, then the last close
PHASES = (10, 3, 5, 4)


def _run_workload(root: Path) -> None:
    i = 0
    store = Store.open(root, segment_bytes=SEGMENT_BYTES, node_id="n1")
    try:
        for phase, count in enumerate(PHASES):
            for _ in range(count):
                store.commit(_ops(i), durability=_durability(i))
                i += 1
            if phase == 0:
                assert store.checkpoint().segments_removed > 0
            elif phase == 1:
                store.close()
                store = Store.open(root, segment_bytes=SEGMENT_BYTES)
            elif phase == 2:
                store.compact()
    finally:
        store.close()


def _expected_states() -> list[dict[str, Any]]:
    """``states[p]``: what a reader sees after the commits of LSN 1..p."""
    states: list[dict[str, Any]] = [{}]
    for i in range(sum(PHASES)):
        states.append(apply_ops(states[-1], _ops(i)))
    for p in range(1, len(states)):
        assert states[p] != states[p - 1]
    return states


def _record(root: Path) -> list[Event]:
    root.mkdir()
    with FsRecorder(root) as recorder:
        _run_workload(root)
    events = recorder.events
    acks = [e for e in events if isinstance(e, Ack)]
    # one thread: the seq-th commit call gets LSN seq + 1
    assert [a.lsn for a in acks] == [a.seq + 1 for a in acks] == list(range(1, sum(PHASES) + 1))
    return events


@dataclass(frozen=True)
class Violation:
    label: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.label}: {self.kind}: {self.detail}"


@dataclass
class Tally:
    states: int = 0
    torn_tails: int = 0
    wal_holes: int = 0
    lost_unacknowledged: int = 0
    snapshots_rebuilt: int = 0


def _bounds(events: Sequence[Event], point: int) -> tuple[int, int]:
    """(every durable acknowledgement up to here, the last LSN a commit started)."""
    low = high = 0
    for event in events[:point]:
        if isinstance(event, Ack) and event.durable:
            low = max(low, event.lsn)
        elif isinstance(event, Intent):
            high = event.seq + 1
    return low, high


def check_state(
    state: CrashState,
    events: Sequence[Event],
    expected: list[dict[str, Any]],
    where: Path,
    tally: Tally,
) -> Violation | None:
    """Open one crash state and judge what it recovered."""
    low, high = _bounds(events, state.point)
    materialize(state, where)
    try:
        return _judge(state, where, expected, low, high, tally)
    finally:
        shutil.rmtree(where)


def _judge(
    state: CrashState, where: Path, expected: list[dict[str, Any]], low: int, high: int,
    tally: Tally,
) -> Violation | None:
    tally.states += 1
    try:
        store = Store.open(where, segment_bytes=SEGMENT_BYTES)
    except Exception as exc:  # noqa: BLE001 - any refusal of a producible state is the finding
        return Violation(state.label, "refused", f"{type(exc).__name__}: {exc}")
    try:
        try:
            seen = dict(store.scan())
        except Exception as exc:  # noqa: BLE001
            return Violation(state.label, "unreadable", f"{type(exc).__name__}: {exc}")
        applied = store.applied_lsn
        recovery = store.recovery
    finally:
        store.close()
    matches = [p for p, want in enumerate(expected) if want == seen]
    if not matches:
        return Violation(
            state.label, "not-a-prefix",
            f"keys {sorted(seen)} at applied LSN {applied} equal no prefix of the commits",
        )
    p = matches[0]
    if p < low:
        return Violation(
            state.label, "lost-ack",
            f"holds LSN 1..{p}, but LSN {low} was acknowledged as durable",
        )
    if p > high:
        return Violation(state.label, "from-the-future", f"holds LSN {p}; only {high} began")
    if applied != p:
        return Violation(state.label, "lsn-mismatch", f"state of LSN {p}, applied LSN {applied}")
    report = engine.verify(where)
    if not report.ok or report.torn_tail is not None:
        return Violation(state.label, "unclean-after-close", f"{report.damage} {report.torn_tail}")
    assert recovery is not None
    tally.torn_tails += recovery.torn_tail is not None
    tally.wal_holes += recovery.wal_hole is not None
    tally.snapshots_rebuilt += recovery.snapshot_rebuilt is not None
    tally.lost_unacknowledged += p < high
    return None


def _no_sync(target: object) -> None:
    """A sync that does nothing (the checking opens' own writes need none)."""


def check_all(
    states: Iterable[CrashState],
    events: Sequence[Event],
    scratch: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    stop_at: Callable[[Violation], bool] | None = None,
) -> tuple[list[Violation], Tally]:
    """Check each state as opened after the machine restarted (another boot id).

    The checking opens need no durability of their own: their syncs are
    skipped (which makes each state several times cheaper to check).
    """
    monkeypatch.setattr(_fs, "boot_id", lambda: "boot-after-the-power-loss")
    for name in ("fdatasync", "fsync", "fsync_dir"):
        monkeypatch.setattr(_fs, name, _no_sync)
    expected = _expected_states()
    tally = Tally()
    found: list[Violation] = []
    for n, state in enumerate(states):
        violation = check_state(state, events, expected, scratch / f"s{n}", tally)
        if violation is not None:
            found.append(violation)
            if stop_at is not None and stop_at(violation):
                break
    return found, tally


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """Where crash states are written: in memory where the system offers it
    (each state is a few files made and removed; on disk that is most of the
    time a check takes)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    where = Path(tempfile.mkdtemp(prefix="walsync-powerloss-", dir=shm))
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> list[Event]:
    return _record(tmp_path_factory.mktemp("powerloss") / "store")


def test_powerloss_every_allowed_crash_state_recovers_a_durable_prefix(
    trace: list[Event], scratch: Path, monkeypatch: pytest.MonkeyPatch,
    fault_summary: KillSummary,
) -> None:
    violations, tally = check_all(crash_states(trace, SEED), trace, scratch, monkeypatch)
    fault_summary.add("power-loss crash states", tally.states, MIN_STATES,
                      f"from {len(trace)} trace events, {len(violations)} violations")
    assert not violations, "\n".join(map(str, violations[:20]))
    assert tally.states >= MIN_STATES, tally
    # the states reach the interesting cases: cut tails, lost unacknowledged
    # commits, and a snapshot ahead of a WAL that lost 'none' commits
    assert tally.torn_tails > 0, tally
    assert tally.lost_unacknowledged > 0, tally
    assert tally.wal_holes > 0, tally
    assert tally.snapshots_rebuilt > 0, tally


# -- planted bugs ------------------------------------------------------------------


def _ack_before_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted bug 1: the fdatasync a durable commit needs runs only at the next
    write, after the commit has returned."""
    real_append = wal.WALWriter.append

    def append(self: wal.WALWriter, records: Any, sync: bool) -> None:
        self.sync()
        real_append(self, records, False)

    monkeypatch.setattr(wal.WALWriter, "append", append)


def test_powerloss_checker_catches_acknowledge_before_fsync(
    tmp_path: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as bug:
        _ack_before_fsync(bug)
        events = _record(tmp_path / "store")
    violations, _tally = check_all(
        crash_states(events, SEED), events, scratch, monkeypatch,
        stop_at=lambda v: v.kind == "lost-ack",
    )
    assert any(v.kind == "lost-ack" for v in violations), violations


def _decode_frame_skipping_checksum(
    buf: bytes | memoryview, offset: int, path: str = ""
) -> tuple[int, Frame | None]:
    """Planted bug 2: ``record.decode_frame`` without its checksum comparison."""
    end = len(buf)
    if end - offset < FRAME_HEADER_BYTES:
        return FrameStatus.INCOMPLETE, None
    _checksum, magic, _version, _flags, length, lsn, synced = _FRAME_HEADER.unpack_from(
        buf, offset
    )
    if magic != FRAME_MAGIC or length > MAX_PAYLOAD_BYTES:
        return FrameStatus.BAD, None
    stop = offset + FRAME_HEADER_BYTES + length
    if stop > end:
        return FrameStatus.INCOMPLETE, None
    payload = bytes(memoryview(buf)[offset + FRAME_HEADER_BYTES : stop])
    return FrameStatus.OK, Frame(lsn, synced, offset, FRAME_HEADER_BYTES + length, payload)


def _damaged_tail_states(events: Sequence[Event]) -> Iterator[CrashState]:
    """States whose unsynced bytes are partly written or garbage (the bug's prey)."""
    for state in crash_states(events, SEED):
        if state.data_mode in ("torn", "blocks", "garbage"):
            yield state


def test_powerloss_checker_catches_skipped_checksum(
    trace: list[Event], scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the scanner's fast path checks the checksum inline; a mismatch falls to
    # decode_frame, which the bug makes take anything with a frame's magic
    monkeypatch.setattr(wal, "decode_frame", _decode_frame_skipping_checksum)
    violations, _tally = check_all(
        _damaged_tail_states(trace), trace, scratch, monkeypatch,
        stop_at=lambda v: v.kind == "not-a-prefix",
    )
    assert any(v.kind == "not-a-prefix" for v in violations), violations


# -- regressions: engine defects the crash states found ------------------------------


def _first(events: Sequence[Event], match: Callable[[Event], bool], after: int = 0) -> int:
    return next(i for i in range(after, len(events)) if match(events[i]))


def test_powerloss_during_store_creation_rebuilds_a_torn_snapshot(
    trace: list[Event], scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the open that creates the store writes the OPEN marker before LMDB makes
    # its file: a power loss right after finds the marker, and a torn LMDB
    # file (zeros, garbage) is rebuilt rather than refused as "not an LMDB file"
    point = _first(trace, lambda e: isinstance(e, LiveSnapshot) and e.created) + 1
    states = [crash_state(trace, point, "keep", "keep", SEED, mode) for mode in ("zero", "garbage")]
    for state in states:
        assert "OPEN" in state.files, state.label
    violations, tally = check_all(states, trace, scratch, monkeypatch)
    assert not violations, violations
    assert tally.snapshots_rebuilt == len(states)


def test_powerloss_after_a_clean_close_keeps_the_lmdb_file_name(
    trace: list[Event], scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a clean close removes the marker: the snapshot is trusted from then on,
    # so LMDB's file must still be there when every unsynced name is lost (the
    # WAL below the checkpoint is gone)
    closed = _first(trace, lambda e: isinstance(e, Unlink) and e.path == "OPEN")
    point = _first(trace, lambda e: isinstance(e, DirSync) and e.path == "", after=closed) + 1
    state = crash_state(trace, point, "drop", "drop", SEED)
    assert "OPEN" not in state.files
    assert "snapshot/data.mdb" in state.files
    assert "wal/0000000000000001.wal" not in state.files  # removed by the checkpoint
    violations, tally = check_all([state], trace, scratch, monkeypatch)
    assert not violations, violations
    assert tally.snapshots_rebuilt == 0
