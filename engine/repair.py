"""`repair`: keep what precedes the first damage to the WAL; rebuild a damaged snapshot.

The WAL. Nothing is deleted: the damaged segment is copied whole, and every
later segment moved, into ``quarantine/<UTC time>/``. The damaged segment is
then cut just before the damage. The LSNs from the damage to the highest one
seen in the quarantined bytes (or held by the snapshot) are recorded in the
STORE file as a known hole and are never handed out again, because the sync
server may already hold records under them. Which damage counts is decided
by the rule open applies (``replay.tail_may_be_torn``): after a clean close a
damaged last record is damage to acknowledged data, not a torn tail.

The snapshot. When verify finds it damaged (a value failing its checksum, a
damaged tree, a snapshot that disagrees with its base copy and the WAL, or
one older than its base), repair builds a new one beside it and moves the
old one to quarantine. The new snapshot starts from the base copy, read value
by value (the next open replays the WAL above it). A value the base lacks or
has damaged is taken from the old snapshot where that copy provably holds the
same version (the WAL holds every record between the two copies and none of
them touched the key); a key that nothing intact can give back and no record
above the base rewrites is lost, and named. Without a usable base the start is
the WAL from LSN 1 when the log still holds it, else the old snapshot's intact
values. A damaged base (or one the WAL cannot bridge to the snapshot) is
replaced by a copy of the repaired snapshot.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import _fs
from .base import finish_base_swap, read_base_lsn, write_base
from .check import GONE, joined, open_checked, snapshot_trusted, verify
from .errors import (
    CorruptionError,
    FormatVersionError,
    StoreNotFoundError,
    error_from_os,
)
from .layout import StoreLayout
from .lock import WriterLock
from .record import (
    FRAME_MAGIC,
    FRAME_MAGIC_OFFSET,
    SEGMENT_HEADER_BYTES,
    decode_frame,
)
from .replay import describe_torn_tail, gap_allowed, walk_log
from .snapshot import SnapshotStore
from .snapshot.bulk import finish_compaction, load
from .snapshot.pagecheck import CheckedFile
from .snapshot.seal import APPLIED_LSN_NAME, HLC_NAME, META_OP_PREFIX, key_text
from .storefile import read_store_file, write_store_file
from .wal import TornTail

__all__ = [
    "RESTORE_HINT",
    "RepairReport",
    "repair",
]

#: how to bring back keys a repair could not rebuild
RESTORE_HINT = (
    "bring them back from the sync server: `walsync restore --to NEW --prefix KEY` builds a "
    "store of them, then `walsync export --prefix KEY FILE` there and `walsync import FILE` "
    "here"
)
#: at most this many lost keys are named in a report (the rest are counted)
_MAX_NAMED = 1000
#: metadata a rebuilt snapshot takes over from the newest copy that has it intact:
#: sync's bookkeeping, which no record carries
_RETAIN_FLOOR = b"retain_floor"
_SYNC_PREFIX = b"sync/"


@dataclass(frozen=True)
class RepairReport:
    damaged: bool
    message: str = ""
    segment: str | None = None
    offset: int | None = None
    first_lost_lsn: int | None = None
    last_lost_lsn: int | None = None
    #: lost LSNs the snapshot did not hold either: their effects are gone
    records_lost_from_state: int = 0
    quarantine: str | None = None
    moved: list[str] = field(default_factory=list)
    #: the snapshot was rebuilt; the old one was moved to ``snapshot_quarantine``
    snapshot_rebuilt: bool = False
    #: what verify found in the snapshot and its base (the first problems)
    snapshot_damage: list[str] = field(default_factory=list)
    snapshot_quarantine: str | None = None
    #: what the rebuilt snapshot started from, and the LSN it holds (the next open
    #: replays the WAL above it)
    rebuilt_from: str = ""
    rebuilt_lsn: int | None = None
    #: the base copy was replaced by a copy of the (repaired) snapshot
    base_rewritten: bool = False
    #: keys whose value nothing intact could give back (as the damaged file names them)
    lost_keys: list[str] = field(default_factory=list)
    #: more lost keys than are named, and values lost with their keys unreadable
    lost_keys_not_named: int = 0
    lost_unnamed_at_most: int = 0
    #: the way to bring lost keys back
    restore_hint: str = ""


def repair(path: str | Path, *, lock_timeout_seconds: float = 0.0) -> RepairReport:
    layout = StoreLayout(path)
    if not layout.store_file.exists():
        raise StoreNotFoundError(f"no walsync store at {path}")
    lock = WriterLock(layout.lock_file, str(path))
    try:
        lock.acquire(lock_timeout_seconds)
        try:
            return _repair_locked(layout)
        finally:
            lock.release()
    except OSError as exc:
        # each step leaves the store openable or repairable again (see above)
        raise error_from_os(exc, f"repairing store {path}") from exc


def _repair_locked(layout: StoreLayout) -> RepairReport:
    wal = _repair_wal(layout)
    snapshot = _repair_snapshot(layout)
    if snapshot is None:
        return wal
    if wal.damaged:
        return replace(snapshot, damaged=True, message=wal.message, segment=wal.segment,
                       offset=wal.offset, first_lost_lsn=wal.first_lost_lsn,
                       last_lost_lsn=wal.last_lost_lsn,
                       records_lost_from_state=wal.records_lost_from_state,
                       quarantine=wal.quarantine, moved=wal.moved)
    return snapshot


# -- the WAL ---------------------------------------------------------------------------


def _find_damage(
    layout: StoreLayout, gaps: list[tuple[int, int]]
) -> tuple[tuple[int, int, int, CorruptionError] | None, TornTail | None]:
    """(segment index, offset, first bad LSN, error) of the first damage, or None;
    and the torn tail the next open will cut, if any."""
    torn = None
    for step in walk_log(layout, gaps, decode=True):
        if step.error is not None:
            error = step.error
            if isinstance(error, FormatVersionError):
                raise error  # written by another version: not damage to move aside
            offset = error.offset if error.offset is not None else 0
            lsn = error.lsn if error.lsn is not None else step.first_lsn
            return (step.index, offset, lsn, error), None
        if step.scan is not None and step.scan.torn is not None:
            torn = step.scan.torn
    return None, torn


def _max_intact_lsn(data: bytes) -> int:
    best = 0
    pos = data.find(FRAME_MAGIC)
    while pos >= 0:
        candidate = pos - FRAME_MAGIC_OFFSET
        if candidate >= 0:
            try:
                _status, frame = decode_frame(data, candidate)
            except CorruptionError:
                frame = None
            if frame is not None:
                best = max(best, frame.lsn)
        pos = data.find(FRAME_MAGIC, pos + 1)
    return best


def _snapshot_applied(layout: StoreLayout) -> int:
    """The snapshot's applied LSN as far as it can be read (0 if it cannot)."""
    try:
        opened = open_checked(layout.snapshot_dir, lock=True)
    except (CorruptionError, FormatVersionError):
        return 0
    if opened is None:
        return 0
    try:
        return opened.check.applied_lsn or 0
    finally:
        opened.close()


def _repair_wal(layout: StoreLayout) -> RepairReport:
    meta = read_store_file(layout.store_file)
    gaps = [(int(a), int(b)) for a, b in meta.get("lsn_gaps", [])]
    finish_compaction(layout.snapshot_dir)
    found, torn = _find_damage(layout, gaps)
    if found is None:
        if torn is not None:
            return RepairReport(False, f"no damage found; {describe_torn_tail(torn)}")
        return RepairReport(False, "no damage found")
    index, offset, first_lost, error = found
    segments = layout.list_segments()
    max_seen = first_lost - 1
    for i in range(index, len(segments)):
        max_seen = max(max_seen, _max_intact_lsn(segments[i][1].read_bytes()))
    applied = _snapshot_applied(layout)
    last_lost = max(max_seen, applied, first_lost)
    lost_from_state = max(0, max_seen - max(applied, first_lost - 1))
    # Reserve the lost LSNs before anything moves, so that a repair stopped half
    # way never lets them be handed out again. The hole itself is recorded only
    # once the segments are gone: recorded before, it would let open replay the
    # intact segments after a missing one. (An open in between records the hole
    # by itself, as the LSNs it skips for min_next_lsn.)
    meta["min_next_lsn"] = max(int(meta.get("min_next_lsn", 1)), last_lost + 1)
    write_store_file(layout.store_file, meta)

    quarantine = layout.new_quarantine_dir()
    moved: list[str] = []
    for i in range(index, len(segments)):
        seg_path = segments[i][1]
        target = quarantine / seg_path.name
        if i == index and offset >= SEGMENT_HEADER_BYTES:
            _fs.copy_file(seg_path, target)
            fd = _fs.open_segment(seg_path, create=False)
            try:
                _fs.truncate(fd, offset)
                _fs.fsync(fd)
            finally:
                os.close(fd)
        else:
            _fs.rename(seg_path, target)
        moved.append(seg_path.name)
    _fs.fsync_dir(quarantine)
    _fs.fsync_dir(layout.wal_dir)

    if not gap_allowed(gaps, first_lost, last_lost):
        gaps.append((first_lost, last_lost))
    meta["lsn_gaps"] = [list(g) for g in gaps]
    write_store_file(layout.store_file, meta)
    return RepairReport(
        True,
        str(error),
        segments[index][1].name,
        offset,
        first_lost,
        max_seen if max_seen >= first_lost else None,
        lost_from_state,
        str(quarantine),
        moved,
    )


# -- the snapshot ----------------------------------------------------------------------


def _repair_snapshot(layout: StoreLayout) -> RepairReport | None:
    """Rebuild the snapshot, or replace the base, when verify finds them damaged;
    None when both check out (or the next open rebuilds the snapshot anyway)."""
    finish_base_swap(layout)
    report = verify(layout.root)
    snap_file = str(layout.snapshot_dir / "data.mdb")
    base_files = {str(layout.base_dir / "data.mdb"), str(layout.base_dir / "BASE")}
    snap_damage = [d.message for d in report.damage if d.path == snap_file]
    base_damage = [d.message for d in report.damage if d.path in base_files]
    # the WAL cannot take the base up to the snapshot: a new base closes the gap
    unbridged = [d.message for d in report.damage if d.path == str(layout.wal_dir)]
    found = (snap_damage + base_damage + unbridged)[:20]
    if snapshot_trusted(layout) is not None:
        # the machine went down under the writer: verify left the snapshot alone,
        # and the next open rebuilds it from the base, which must be able to
        if not base_damage and not unbridged:
            return None
        return _rebuild(layout, found, base_bad=True)
    if not snap_damage and not base_damage and not unbridged:
        return None
    if not snap_damage:
        snapshot = SnapshotStore(layout.snapshot_dir, map_size_bytes=1 << 20)
        try:
            snapshot.sync()
            write_base(layout, snapshot)
        finally:
            snapshot.close()
        return RepairReport(True, found[0], snapshot_damage=found, base_rewritten=True)
    return _rebuild(layout, found, base_bad=bool(base_damage or unbridged))


class _Log:
    """The records the WAL holds: which LSNs, and the last LSN that touched each key."""

    def __init__(self, layout: StoreLayout, gaps: list[tuple[int, int]]) -> None:
        self.ranges: list[tuple[int, int]] = []
        self.last_touch: dict[bytes, int] = {}
        for step in walk_log(layout, gaps, decode=True):
            if step.error is not None or step.scan is None or step.records is None:
                break  # the WAL's own repair ran first: nothing past damage is used
            for lsn, _kind, _hlc, ops in step.records:
                if self.ranges and self.ranges[-1][1] == lsn - 1:
                    self.ranges[-1] = (self.ranges[-1][0], lsn)
                else:
                    self.ranges.append((lsn, lsn))
                for key, _entry in ops:
                    name = key.encode() if key else b""
                    self.last_touch[name] = lsn

    def covers(self, after: int, upto: int) -> bool:
        """Whether the WAL holds every record in (after, upto]."""
        if upto <= after:
            return True
        return any(lo <= after + 1 and upto <= hi for lo, hi in self.ranges)


def _rebuild(layout: StoreLayout, found: list[str], *, base_bad: bool) -> RepairReport:
    meta = read_store_file(layout.store_file)
    gaps = [(int(a), int(b)) for a, b in meta.get("lsn_gaps", [])]
    log = _Log(layout, gaps)
    snap: CheckedFile | None = None
    base: CheckedFile | None = None
    try:
        try:
            snap = open_checked(layout.snapshot_dir, lock=True)
        except CorruptionError:
            snap = None
        try:
            base_lsn = read_base_lsn(layout)
            base = open_checked(layout.base_dir, lock=False) if base_lsn else None
        except CorruptionError:
            base = None
        if base is not None and base.check.applied_lsn != base_lsn:
            base.close()
            base = None
        snap_lsn = snap.check.applied_lsn if snap is not None else None
        plan = _plan(log, snap, snap_lsn, base)
        fresh = layout.snapshot_dir.with_name(layout.snapshot_dir.name + ".compact")
        if fresh.exists():
            _fs.remove_tree(fresh)
        target = SnapshotStore(fresh, map_size_bytes=1 << 20)
        try:
            load(target, plan.entries(), plan.meta())
            target.sync()
        finally:
            target.close()
    finally:
        for opened in (snap, base):
            if opened is not None:
                opened.close()
    quarantine = layout.new_quarantine_dir()
    if layout.snapshot_dir.exists():
        _fs.rename(layout.snapshot_dir, quarantine / layout.snapshot_dir.name)
        _fs.fsync_dir(quarantine)
    # a crash here leaves no snapshot/ but a complete, synced snapshot.compact/:
    # the next open (or repair) puts it in place (finish_compaction)
    _fs.rename(fresh, layout.snapshot_dir)
    _fs.fsync_dir(layout.root)
    rewrite_base = base_bad or plan.source != "base"
    if rewrite_base:
        snapshot = SnapshotStore(layout.snapshot_dir, map_size_bytes=1 << 20)
        try:
            write_base(layout, snapshot)
        finally:
            snapshot.close()
    lost = [key_text(k) for k in plan.lost]
    return RepairReport(
        True, found[0] if found else "the snapshot is damaged",
        snapshot_rebuilt=True,
        snapshot_damage=found,
        snapshot_quarantine=str(quarantine),
        rebuilt_from=plan.describe(),
        rebuilt_lsn=plan.lsn,
        base_rewritten=rewrite_base,
        lost_keys=lost[:_MAX_NAMED],
        lost_keys_not_named=max(0, len(lost) - _MAX_NAMED),
        lost_unnamed_at_most=plan.hidden,
        restore_hint=RESTORE_HINT if lost or plan.hidden else "",
    )


class _Plan:
    """Where the rebuilt snapshot's values come from (see the module's description)."""

    def __init__(self, source: str, lsn: int, primary: CheckedFile | None,
                 secondary: CheckedFile | None, secondary_lsn: int | None, log: _Log) -> None:
        self.source = source
        self.lsn = lsn
        self._primary = primary
        self._secondary = secondary
        self._secondary_lsn = secondary_lsn
        self._log = log
        self.lost: list[bytes] = []
        self.hidden = 0

    def describe(self) -> str:
        where = {"base": "the base copy", "wal": "the WAL from LSN 1",
                 "snapshot": "the old snapshot's intact values"}[self.source]
        return f"{where} (LSN {self.lsn}), the next open replays the WAL above it"

    def _fallback_ok(self, key: bytes) -> bool:
        """Whether the secondary copy's entry for ``key`` is its version at the start
        LSN: the WAL holds every record between the two copies, none touching it."""
        s = self._secondary_lsn
        if self._secondary is None or s is None:
            return False
        last = self._log.last_touch.get(key, 0)
        if s >= self.lsn:
            return self._log.covers(self.lsn, s)
        return self._log.covers(s, self.lsn) and last <= s

    def entries(self) -> Iterator[tuple[bytes, bytes]]:
        primary = self._primary.entries() if self._primary is not None else iter(())
        secondary = self._secondary.entries() if self._secondary is not None else iter(())
        check = self._primary.check if self._primary is not None else None
        taken_for_gone = 0
        for key, p, s in joined(primary, secondary):
            if isinstance(p, bytes):
                yield key, p
                continue
            if self._log.last_touch.get(key, 0) > self.lsn:
                continue  # a record above the start rewrites the whole entry
            trusted_absence = p is GONE and check is not None and check.complete \
                and not check.damaged
            if p is GONE and (check is None or trusted_absence):
                continue  # the key did not exist at the start (the other copy is stale)
            if isinstance(s, bytes) and self._fallback_ok(key):
                if p is GONE:
                    taken_for_gone += 1
                yield key, s
                continue
            self.lost.append(key)
        if check is not None and check.recorded_entries > check.entries:
            self.hidden = max(0, check.recorded_entries - check.entries - taken_for_gone)

    def meta(self) -> dict[bytes, bytes]:
        """The rebuilt snapshot's metadata: the start LSN, the highest HLC either
        copy knows, sync's bookkeeping from the newer copy that has it intact, and
        the values records' meta ops set as of the start. Anything else (an index
        a writer builds) is built again by the next open."""
        copies = [c for c in (self._primary, self._secondary) if c is not None]
        out: dict[bytes, bytes] = {}
        for copy in sorted(copies, key=lambda c: c.check.applied_lsn or 0):
            for name, value in copy.check.meta.items():
                # only what nothing can derive again (an index a writer builds on
                # open must not be claimed for a table that was not copied)
                if name == _RETAIN_FLOOR or name.startswith(_SYNC_PREFIX):
                    out[name] = value
        if self._primary is not None:
            for name, value in self._primary.check.meta.items():
                if name.startswith(META_OP_PREFIX):
                    out[name] = value
        hlc = max((int.from_bytes(c.check.meta.get(HLC_NAME, b""), "little") for c in copies),
                  default=0)
        out[HLC_NAME] = hlc.to_bytes(8, "little")
        out[APPLIED_LSN_NAME] = self.lsn.to_bytes(8, "little")
        return out


def _plan(log: _Log, snap: CheckedFile | None, snap_lsn: int | None,
          base: CheckedFile | None) -> _Plan:
    """The start: the base if the WAL bridges it to the snapshot, else the WAL from
    LSN 1, else the old snapshot."""
    base_lsn = base.check.applied_lsn if base is not None else None
    if base is not None and base_lsn is not None and (
            snap_lsn is None or snap_lsn <= base_lsn or log.covers(base_lsn, snap_lsn)):
        return _Plan("base", base_lsn, base, snap, snap_lsn, log)
    from_one = bool(log.ranges) and log.ranges[0][0] == 1
    if (from_one and log.covers(0, snap_lsn or 0)) or (not log.ranges and snap_lsn == 0):
        # every record is in the WAL; the old snapshot only lends sync's bookkeeping
        return _Plan("wal", 0, None, snap, snap_lsn, log)
    if snap is not None and snap_lsn is not None:
        return _Plan("snapshot", snap_lsn, snap, base, base_lsn, log)
    raise CorruptionError(
        "the snapshot cannot be rebuilt: its base copy is unusable, the WAL does not go back "
        "to LSN 1 and the snapshot itself cannot be read",
        hint="restore the store from the sync server (`walsync restore --to NEW`)",
    )
