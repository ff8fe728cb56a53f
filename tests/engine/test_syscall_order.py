"""The syscall-order audit: a recorded trace obeys four ordering rules.

A workload that touches every write path of the engine (store creation and
its lock file, commits across segment rotations, a checkpoint that writes a
base and removes segments, metadata writes, a compaction, a repair after
damage, a reopen that replays, clean closes) runs under the file-operation
recorder of ``tests/engine/_fstrace.py``. The audit then walks the trace:

1. **fsync before acknowledgement**: when a durable commit returns, every
   frame up to its LSN was written and then fdatasync'ed (or fsynced).
2. **directory sync after create and rename**: when a durable commit
   returns, every WAL segment, the WAL directory and the STORE file have
   names a directory sync made durable; and when a clean close removes the
   OPEN marker (the snapshot is trusted from then on), and at the end, no
   name the engine created or renamed (scratch files aside) is without one.
3. **rename only after sync**: a file is renamed only once its bytes are
   synced; a directory only once its files are synced and its names durable.
4. **WAL removed only below a durable checkpoint**: a segment is unlinked only
   when a synced LMDB image holding its last LSN exists under durable names,
   beside a durable ``BASE`` file recording that LSN.

Each rule also gets a hand-made bad trace that it must reject (and the same
trace made good, which it must accept).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.engine._fstrace import (
    Ack,
    Capture,
    Checkpoint,
    Create,
    DirSync,
    Event,
    FsRecorder,
    MakeDir,
    Rename,
    Replayed,
    Sync,
    Unlink,
    Write,
    parent,
    under,
)
from walsync import engine
from walsync.engine import Put, Store
from walsync.engine.layout import parse_segment_name
from walsync.engine.record import (
    SEGMENT_HEADER_BYTES,
    decode_frame,
    encode_frame,
    encode_segment_header,
)

SEGMENT_BYTES = 4096
#: names that nothing depends on: the lock, the next segment before it is
#: named, a temporary file before its rename, LMDB's lock file
SCRATCH = ("LOCK", "wal/prepared.tmp")

Rule = Callable[[Sequence[Event]], list[str]]


def _is_segment(path: str) -> bool:
    return parent(path) == "wal" and parse_segment_name(path.rpartition("/")[2]) is not None


def _frame_lsns(write: Write) -> list[int]:
    """LSNs of the whole frames a write put down (a segment header first at offset 0)."""
    data = write.data
    pos = SEGMENT_HEADER_BYTES if write.offset == 0 else 0
    lsns = []
    while pos < len(data):
        _status, frame = decode_frame(data, pos)
        if frame is None:
            break
        lsns.append(frame.lsn)
        pos += frame.size
    return lsns


def rule_fsync_before_ack(events: Sequence[Event]) -> list[str]:
    found = []
    model = Replayed()
    unsynced: dict[int, set[int]] = {}  # segment file → LSNs written since its last sync
    for i, event in enumerate(events):
        if isinstance(event, Write):
            paths = {fid: p for p, fid in model.namespace(durable_only=False)[0].items()}
            if _is_segment(paths.get(event.fid, "")):
                for lsn in _frame_lsns(event):
                    unsynced.setdefault(event.fid, set()).add(lsn)
        elif isinstance(event, Sync):
            unsynced.pop(event.fid, None)
        elif isinstance(event, Ack) and event.durable:
            late = sorted(
                lsn for lsns in unsynced.values() for lsn in lsns if lsn <= event.lsn
            )
            if late:
                found.append(
                    f"event {i}: LSN {event.lsn} acknowledged before LSNs {late} were synced"
                )
        model.feed(event)
    return found


def rule_dir_sync_after_names(events: Sequence[Event]) -> list[str]:
    found = []
    model = Replayed()
    for i, event in enumerate(events):
        if isinstance(event, Unlink) and event.path == "OPEN":
            # a clean close: from here on the snapshot is trusted as it is
            found += _names_left_unsynced(model, f"event {i} (clean close)")
        if isinstance(event, Ack) and event.durable:
            for op in model.names:
                target = op.event
                path = target.dst if isinstance(target, Rename) else getattr(target, "path", "")
                needed = _is_segment(path) or path in ("STORE", "wal")
                if needed and op.unsynced_dirs and not isinstance(target, Unlink):
                    found.append(
                        f"event {i}: LSN {event.lsn} acknowledged while {type(target).__name__} "
                        f"of {path} awaits a sync of {sorted(op.unsynced_dirs)}"
                    )
        model.feed(event)
    return found + _names_left_unsynced(model, "end")


def _names_left_unsynced(model: Replayed, where: str) -> list[str]:
    """Names (scratch files aside) that exist and no directory sync made durable."""
    found = []
    live = model.namespace(durable_only=False)
    for op in model.names:
        target = op.event
        if isinstance(target, Unlink) or not op.unsynced_dirs:
            continue
        path = target.dst if isinstance(target, Rename) else target.path
        exists = path in live[0] or path in live[1]
        if exists and path not in SCRATCH and not path.endswith(".tmp"):
            found.append(
                f"{where}: {type(target).__name__} of {path} not followed by a sync of "
                f"{sorted(op.unsynced_dirs)}"
            )
    return found


def rule_rename_after_sync(events: Sequence[Event]) -> list[str]:
    found = []
    model = Replayed()
    for i, event in enumerate(events):
        if isinstance(event, Rename):
            entries, dirs = model.namespace(durable_only=False)
            if event.src in entries:
                if model.files[entries[event.src]].pending:
                    found.append(f"event {i}: {event.src} renamed with unsynced writes")
            elif event.src in dirs:
                for path, fid in entries.items():
                    if under(path, event.src) and model.files[fid].pending:
                        found.append(
                            f"event {i}: directory {event.src} renamed with unsynced "
                            f"writes to {path}"
                        )
                for op in model.names:
                    inside = {d for d in op.unsynced_dirs if under(d, event.src)}
                    if inside and not isinstance(op.event, Unlink):
                        found.append(
                            f"event {i}: directory {event.src} renamed while a name in it "
                            f"awaits a sync of {sorted(inside)}"
                        )
        model.feed(event)
    return found


def _durable_checkpoints(model: Replayed, checkpoints: dict[int, int]) -> int:
    """The highest LSN a synced LMDB image under durable names holds, beside a
    durable BASE file that records at least that LSN."""
    entries, _dirs = model.namespace(durable_only=True)
    best = 0
    for path, fid in entries.items():
        lsn = checkpoints.get(fid)
        if lsn is None or model.files[fid].pending:
            continue
        base = entries.get(f"{parent(path)}/BASE")
        if base is None:
            continue
        try:
            recorded = int(json.loads(bytes(model.files[base].synced))["lsn"])
        except (ValueError, KeyError, TypeError):
            continue
        best = max(best, min(lsn, recorded))
    return best


def rule_wal_removed_below_checkpoint(events: Sequence[Event]) -> list[str]:
    found = []
    model = Replayed()
    last_lsn: dict[int, int] = {}  # segment file → the highest LSN written to it
    checkpoints: dict[int, int] = {}
    for i, event in enumerate(events):
        if isinstance(event, Write):
            lsns = _frame_lsns(event)
            if lsns:
                last_lsn[event.fid] = max(last_lsn.get(event.fid, 0), *lsns)
        elif isinstance(event, Checkpoint):
            checkpoints[event.fid] = event.lsn
        elif isinstance(event, Capture):
            checkpoints.pop(event.fid, None)  # a new image: its Checkpoint follows
        elif isinstance(event, Unlink) and _is_segment(event.path):
            fid = model.namespace(durable_only=False)[0].get(event.path)
            top = last_lsn.get(fid, 0) if fid is not None else 0
            if top:
                durable = _durable_checkpoints(model, checkpoints)
                if durable < top:
                    found.append(
                        f"event {i}: {event.path} (up to LSN {top}) removed while the "
                        f"durable checkpoint holds LSN {durable}"
                    )
        model.feed(event)
    return found


RULES: dict[str, Rule] = {
    "fsync before acknowledgement": rule_fsync_before_ack,
    "directory sync after create and rename": rule_dir_sync_after_names,
    "rename only after sync": rule_rename_after_sync,
    "WAL removed only below a durable checkpoint": rule_wal_removed_below_checkpoint,
}


# -- the workload ------------------------------------------------------------------


def _damage_first_segment(root: Path) -> None:
    """Flip a byte inside a frame of the oldest segment (outside the trace: the
    damage a repair is for, not an engine write)."""
    segments = engine.layout.StoreLayout(root).list_segments()
    assert len(segments) >= 2
    path = segments[0][1]  # the ones after it are moved aside whole
    with open(path, "r+b") as f:
        f.seek(SEGMENT_HEADER_BYTES + 40)
        byte = f.read(1)
        f.seek(SEGMENT_HEADER_BYTES + 40)
        f.write(bytes([byte[0] ^ 0xFF]))


def _workload(root: Path) -> None:
    def commits(store: Store, first: int, count: int) -> None:
        for i in range(first, first + count):
            value = {"i": i, "pad": bytes(range(256)) * 2}
            store.commit([Put(f"k{i % 4}", value)], durability="none" if i % 5 == 3 else "local")

    with Store.open(root, segment_bytes=SEGMENT_BYTES, node_id="audit") as store:
        commits(store, 0, 12)
        store.set_retain_floor(None)
        store.sync_ledger.set_acked_lsn(5)
        assert store.checkpoint().segments_removed > 0
    with Store.open(root, segment_bytes=SEGMENT_BYTES) as store:
        commits(store, 12, 8)
        store.compact()
        commits(store, 20, 12)
    _damage_first_segment(root)
    assert engine.repair(root).damaged
    with Store.open(root, segment_bytes=SEGMENT_BYTES) as store:
        commits(store, 32, 10)
        store.checkpoint()
        commits(store, 42, 2)


@pytest.fixture(scope="module")
def audit_trace(tmp_path_factory: pytest.TempPathFactory) -> list[Event]:
    root = tmp_path_factory.mktemp("audit") / "store"
    root.mkdir()
    with FsRecorder(root) as recorder:
        _workload(root)
    return recorder.events


def test_syscall_order_workload_reaches_every_write_path(audit_trace: list[Event]) -> None:
    kinds = {type(e).__name__ for e in audit_trace}
    assert {"Create", "MakeDir", "Write", "Truncate", "Sync", "Capture", "DirSync", "Rename",
            "Unlink", "Ack", "Checkpoint"} <= kinds, kinds
    names = [e.dst for e in audit_trace if isinstance(e, Rename)]
    for name in ("STORE", "OPEN", "snapshot-base", "snapshot"):  # the last: compaction's swap
        assert name in names
    assert any(_is_segment(n) for n in names)  # a prepared file named as a segment
    assert any(n.startswith("quarantine/") for n in names)  # repair moved segments aside
    assert any(isinstance(e, Unlink) and _is_segment(e.path) for e in audit_trace)
    assert sum(isinstance(e, Ack) and e.durable for e in audit_trace) >= 25


@pytest.mark.parametrize("rule", RULES)
def test_syscall_order_trace_obeys(audit_trace: list[Event], rule: str) -> None:
    assert RULES[rule](audit_trace) == []


# -- each rule rejects a hand-made bad trace -----------------------------------------

SEG = "wal/0000000000000001.wal"


def _segment_bytes(*lsns: int) -> bytes:
    return encode_segment_header(1) + b"".join(encode_frame(n, n - 1, b"\x80") for n in lsns)


def _named_segment() -> list[Event]:
    """wal/ and a segment file, both with durable names."""
    return [MakeDir("wal"), DirSync(""), Create(1, SEG), DirSync("wal")]


def test_syscall_order_rule_fsync_before_ack_fires() -> None:
    bad: list[Event] = [*_named_segment(), Write(1, 0, _segment_bytes(1)), Ack(0, 1, True)]
    assert any("before LSNs [1] were synced" in v for v in rule_fsync_before_ack(bad))
    good = [*bad[:-1], Sync(1, "fdatasync"), bad[-1]]
    assert rule_fsync_before_ack(good) == []
    # a 'none' commit promises no sync
    assert rule_fsync_before_ack([*bad[:-1], Ack(0, 1, False)]) == []


def test_syscall_order_rule_dir_sync_after_names_fires() -> None:
    bad: list[Event] = [
        MakeDir("wal"), DirSync(""), Create(1, SEG), Write(1, 0, _segment_bytes(1)),
        Sync(1, "fdatasync"), Ack(0, 1, True),
    ]
    found = rule_dir_sync_after_names(bad)
    assert any(f"Create of {SEG} awaits a sync of ['wal']" in v for v in found), found
    good = [*bad[:3], DirSync("wal"), *bad[3:]]
    assert rule_dir_sync_after_names(good) == []
    # a rename left without its directory sync, with no commit after it
    renamed: list[Event] = [*good, Create(2, "STORE.tmp"), Sync(2, "fsync"),
                            Rename("STORE.tmp", "STORE")]
    found = rule_dir_sync_after_names(renamed)
    assert any("end: Rename of STORE not followed" in v for v in found), found


def test_syscall_order_rule_rename_after_sync_fires() -> None:
    prepared: list[Event] = [MakeDir("wal"), DirSync(""), Create(1, "wal/prepared.tmp"),
                             Write(1, 0, bytes(4096))]
    bad = [*prepared, Rename("wal/prepared.tmp", SEG)]
    assert any("renamed with unsynced writes" in v for v in rule_rename_after_sync(bad))
    assert rule_rename_after_sync([*prepared, Sync(1, "fsync"), bad[-1]]) == []
    # a directory whose file's name was never synced
    copied: list[Event] = [MakeDir("snapshot.compact"), DirSync(""),
                           Create(2, "snapshot.compact/data.mdb"), Capture(2, b"lmdb")]
    bad_dir = [*copied, Rename("snapshot.compact", "snapshot")]
    assert any("awaits a sync of ['snapshot.compact']" in v
               for v in rule_rename_after_sync(bad_dir))
    assert rule_rename_after_sync([*copied, DirSync("snapshot.compact"), bad_dir[-1]]) == []


def test_syscall_order_rule_wal_removed_below_checkpoint_fires() -> None:
    written: list[Event] = [*_named_segment(), Write(1, 0, _segment_bytes(1, 2, 3)),
                            Sync(1, "fdatasync"), MakeDir("snapshot-base"), DirSync("")]

    def base(lsn: int, *, synced_names: bool = True) -> list[Event]:
        info = json.dumps({"format": 1, "lsn": lsn}).encode()
        out: list[Event] = [Create(2, "snapshot-base/data.mdb"), Capture(2, b"lmdb"),
                            Checkpoint(2, lsn), Create(3, "snapshot-base/BASE"),
                            Write(3, 0, info), Sync(3, "fsync")]
        return [*out, DirSync("snapshot-base")] if synced_names else out

    unlink: list[Event] = [Unlink(SEG), DirSync("wal")]
    rule = rule_wal_removed_below_checkpoint
    assert any("durable checkpoint holds LSN 0" in v for v in rule([*written, *unlink]))
    assert any("holds LSN 2" in v for v in rule([*written, *base(2), *unlink]))
    assert any("holds LSN 0" in v for v in rule([*written, *base(3, synced_names=False),
                                                 *unlink]))
    assert rule([*written, *base(3), *unlink]) == []


def test_syscall_order_recorder_traces_every_seam_function() -> None:
    # a file operation added to the seam and not to the recorder would leave
    # the trace (and every rule above) blind to it
    from tests.engine import _fstrace

    names = set(engine._fs.__all__)
    assert names == _fstrace.TRACED_SEAM_NAMES | (names & _fstrace.UNTRACED_SEAM_NAMES)
    assert all(callable(getattr(engine._fs, n)) for n in _fstrace.TRACED_SEAM_NAMES)
