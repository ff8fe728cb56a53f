"""`verify` and `inspect`: read a store and report, never modify it.

Safe to run while a writer is active: it takes no lock and opens the snapshot
read-only. A frame being written at that moment may show as a torn tail.

What verify checks, and how:

1. The WAL: every frame of every segment (checksum, LSN continuity, payload),
   with the rule open applies to its end (``replay.tail_may_be_torn``: only a
   writer that died can have left a torn tail).
2. Every value of the snapshot and of its base copy: its seal (checksum), and
   LMDB's tree walked end to end (keys in order, as many as LMDB counts), so a
   damaged page that hides keys is found as well as one that garbles a value.
3. The snapshot against the WAL it still holds: the base (a copy of the
   snapshot at LSN B, never written since) with the WAL's records in
   (B, A] applied must give the snapshot at LSN A exactly, every key byte for
   byte, and every value a record's meta op set. Each record carries the
   exact entry it leaves for its keys, so this is a merge of three sorted
   streams, not a replay. It also finds what no checksum can: an intact but
   out-of-date entry (a damaged page pointing at an older copy of a page).
   A store with no base is compared with the WAL from LSN 1.

What cannot be checked is said in ``notes`` (not damage): a snapshot the next
open rebuilds anyway (the machine went down under its writer), a log with a
known hole, a base replaced while verify ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cbor2

from . import _fs
from .base import read_base_lsn, untrusted_snapshot_reason
from .errors import CorruptionError, FormatVersionError, StoreNotFoundError
from .layout import StoreLayout
from .lock import writer_is_alive
from .record import decode_entry
from .replay import gap_allowed, tail_may_be_torn, walk_log
from .snapshot.bulk import compaction_survivor
from .snapshot.env import SnapshotUninitialisedError
from .snapshot.pagecheck import MAX_LISTED_PROBLEMS, CheckedFile, FileCheck
from .snapshot.seal import META_OP_PREFIX, REPAIR_HINT, key_text
from .storefile import read_store_file
from .wal import TornTail

__all__ = [
    "GONE",
    "Damage",
    "SegmentReport",
    "VerifyReport",
    "WalOps",
    "joined",
    "open_checked",
    "snapshot_trusted",
    "verify",
]


@dataclass(frozen=True)
class SegmentReport:
    name: str
    first_lsn: int
    last_lsn: int
    records: int
    size_bytes: int


@dataclass(frozen=True)
class Damage:
    message: str
    path: str | None
    offset: int | None
    lsn: int | None

    @classmethod
    def of(cls, exc: CorruptionError) -> Damage:
        return cls(str(exc), exc.path, exc.offset, exc.lsn)


@dataclass
class VerifyReport:
    path: str
    node_id: str
    applied_lsn: int
    segments: list[SegmentReport] = field(default_factory=list)
    damage: list[Damage] = field(default_factory=list)
    torn_tail: TornTail | None = None
    lsn_gaps: list[tuple[int, int]] = field(default_factory=list)
    #: the LSN the base copy holds (None: no base)
    base_lsn: int | None = None
    #: values checked in the snapshot and in the base
    snapshot_entries: int = 0
    base_entries: int = 0
    #: what could not be checked, and why (not damage)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No damage (a torn tail is not damage: the next open cuts it)."""
        return not self.damage

    @property
    def records(self) -> int:
        return sum(s.records for s in self.segments)

    @property
    def first_lsn(self) -> int | None:
        return self.segments[0].first_lsn if self.segments else None

    @property
    def last_lsn(self) -> int | None:
        return self.segments[-1].last_lsn if self.segments else None

    @property
    def wal_bytes(self) -> int:
        return sum(s.size_bytes for s in self.segments)


@dataclass
class WalOps:
    """What the WAL's records in (``after``, ``upto``] leave for each key: the last
    entry written to it (each record carries the exact entry), and the last value
    of each meta op."""

    after: int
    upto: int
    entries: dict[bytes, bytes] = field(default_factory=dict)
    meta: dict[bytes, bytes] = field(default_factory=dict)
    records: int = 0
    first_seen: int | None = None
    last_seen: int | None = None

    def add(self, lsn: int, ops: list[tuple[str, bytes]]) -> None:
        if not self.after < lsn <= self.upto:
            return
        self.records += 1
        if self.first_seen is None:
            self.first_seen = lsn
        self.last_seen = lsn
        for key, entry in ops:
            if key:
                self.entries[key.encode()] = entry
            else:
                for name, value in cbor2.loads(entry).items():
                    self.meta[META_OP_PREFIX + name.encode()] = cbor2.dumps(value)

    @property
    def complete(self) -> bool:
        return self.records == self.upto - self.after

    def missing(self) -> list[tuple[int, int]]:
        """LSN ranges of (after, upto] at either end that no record covered."""
        if self.first_seen is None or self.last_seen is None:
            return [(self.after + 1, self.upto)] if self.upto > self.after else []
        out = []
        if self.first_seen > self.after + 1:
            out.append((self.after + 1, self.first_seen - 1))
        if self.last_seen < self.upto:
            out.append((self.last_seen + 1, self.upto))
        return out


def open_checked(directory: Path, *, lock: bool) -> CheckedFile | None:
    """A CheckedFile, or None where there is nothing to check (no file, an empty
    one, or an environment whose creation was cut short: the next writer
    initialises it). Damage LMDB refuses to open raises CorruptionError."""
    data_file = directory / "data.mdb"
    try:
        if data_file.stat().st_size == 0:
            return None
        return CheckedFile(directory, lock=lock)
    except (FileNotFoundError, SnapshotUninitialisedError):
        return None


def snapshot_trusted(layout: StoreLayout) -> str | None:
    """Why the snapshot is not trusted (the next writer's open rebuilds it from
    its base), or None: the rule a read-only open applies."""
    reason = untrusted_snapshot_reason(layout)
    if reason is not None and _fs.boot_id() is None and writer_is_alive(layout.lock_file):
        return None  # no boot id to compare: a marker under a live writer is its own
    return reason


def verify(
    path: str | Path,
    *,
    decode_payloads: bool = True,
    progress: Callable[[int, int], None] | None = None,
    check_snapshot: bool | None = None,
) -> VerifyReport:
    """Check the WAL, every value of the snapshot and its base, and the snapshot
    against the base and the WAL (see the module's description).

    ``progress(bytes_done, bytes_total)`` is called after each segment.
    ``check_snapshot`` (by default: ``decode_payloads``) checks the values of
    the snapshot and the base; without it only the WAL is checked.
    """
    layout = StoreLayout(path)
    if not layout.store_file.exists():
        raise StoreNotFoundError(f"no walsync store at {path}")
    meta = read_store_file(layout.store_file)
    gaps = [(int(a), int(b)) for a, b in meta.get("lsn_gaps", [])]
    deep = decode_payloads if check_snapshot is None else check_snapshot
    report = VerifyReport(str(path), str(meta["node_id"]), 0, lsn_gaps=gaps)
    snapshot_dir = compaction_survivor(layout.snapshot_dir)
    snap: CheckedFile | None = None
    base: CheckedFile | None = None
    try:
        try:
            snap = open_checked(snapshot_dir, lock=True)
        except FormatVersionError:
            raise  # another version's file is not damage
        except CorruptionError as exc:
            report.damage.append(Damage.of(exc))
        applied = 0
        if snap is not None:
            applied = snap.check.applied_lsn or 0
            if snap.check.format == 1:
                report.notes.append(
                    "the snapshot is of format 1 (values without checksums): they were "
                    "checked by decoding them; the next open for writing seals them")
        report.applied_lsn = applied
        base_lsn = 0
        if deep:
            base, base_lsn = _open_base(layout, report)
        _check_log(layout, gaps, report, decode_payloads, progress,
                   WalOps(min(applied, base_lsn), max(applied, base_lsn)) if deep else None,
                   snap, base)
    finally:
        for opened in (snap, base):
            if opened is not None:
                opened.close()
    return report


def _open_base(layout: StoreLayout, report: VerifyReport) -> tuple[CheckedFile | None, int]:
    """The base, opened to be checked, and its LSN; damage goes to ``report``."""
    try:
        lsn = read_base_lsn(layout)
    except CorruptionError as exc:
        report.damage.append(Damage.of(exc))
        return None, 0
    if not lsn:
        return None, 0
    report.base_lsn = lsn
    try:
        base = open_checked(layout.base_dir, lock=False)
    except FormatVersionError:
        raise
    except CorruptionError as exc:
        report.damage.append(Damage.of(exc))
        return None, lsn
    if base is None:
        report.damage.append(Damage.of(CorruptionError(
            "the snapshot's base copy is missing or empty", path=str(layout.base_dir / "data.mdb"),
            hint=REPAIR_HINT)))
        return None, lsn
    if base.check.format == 1:
        report.notes.append("the base copy is of format 1 (values without checksums): the "
                            "next open for writing replaces it")
    if base.check.applied_lsn != lsn and read_base_lsn(layout) == lsn:
        report.damage.append(Damage.of(CorruptionError(
            f"the base copy holds LSN {base.check.applied_lsn}, its BASE file says {lsn}",
            path=base.check.path, hint=REPAIR_HINT)))
    return base, lsn


def _check_log(
    layout: StoreLayout, gaps: list[tuple[int, int]], report: VerifyReport,
    decode_payloads: bool, progress: Callable[[int, int], None] | None,
    wal: WalOps | None, snap: CheckedFile | None, base: CheckedFile | None,
) -> None:
    segments = layout.list_segments()
    total = sum(_size(p) for _, p in segments)
    done = 0
    wal_damaged = False
    for step in walk_log(layout, gaps, decode=decode_payloads):
        if step.error is not None:
            report.damage.append(Damage.of(step.error))
            wal_damaged = True
            if step.gap:
                continue  # the segment itself comes next
        if progress is not None:
            progress(done, total)
        done += _size(step.path)
        scan = step.scan
        if scan is None:
            continue
        report.segments.append(SegmentReport(step.path.name, step.first_lsn, scan.last_lsn,
                                             len(scan.frames), _size(step.path)))
        if scan.torn is not None:
            report.torn_tail = scan.torn
        if wal is not None and step.records is not None:
            for lsn, _kind, _hlc, ops in step.records:
                wal.add(lsn, ops)
    if progress is not None:
        progress(total, total)
    applied = report.applied_lsn
    if segments and report.ok:
        first_lsn = segments[0][0]
        if first_lsn > applied + 1 and not gap_allowed(gaps, applied + 1, first_lsn - 1):
            report.damage.append(Damage(
                f"the WAL begins at LSN {first_lsn} but the snapshot holds only up to LSN "
                f"{applied} ({segments[0][1]}, offset 0, LSN {applied + 1})",
                str(segments[0][1]), 0, applied + 1))
    if wal is None:
        return
    _check_snapshot(layout, gaps, report, wal, snap, base, wal_damaged)


def _check_snapshot(
    layout: StoreLayout, gaps: list[tuple[int, int]], report: VerifyReport, wal: WalOps,
    snap: CheckedFile | None, base: CheckedFile | None, wal_damaged: bool,
) -> None:
    """Check every value of both files, and the snapshot against base + WAL."""
    untrusted = snapshot_trusted(layout)
    if untrusted is not None and snap is not None:
        report.notes.append(f"the snapshot was not checked: {untrusted}; the next open for "
                            "writing rebuilds it from its base copy and the WAL")
        snap.close()
        snap = None
    applied = report.applied_lsn
    base_lsn = report.base_lsn or 0
    why_not = None
    if snap is None:
        why_not = "there is no snapshot to compare"
    elif snap.check.applied_lsn is None:
        why_not = "the snapshot's applied LSN is damaged"
    elif not snap.walkable:
        why_not = "the snapshot's tree is damaged"
    elif base_lsn and (base is None or not base.walkable):
        why_not = "the base copy cannot be read"
    elif applied < base_lsn:
        report.damage.append(Damage.of(CorruptionError(
            f"the snapshot holds up to LSN {applied}, below its base copy's LSN {base_lsn}: "
            "it lost committed transactions (a damaged page)", path=snap.check.path,
            hint=REPAIR_HINT)))
        why_not = "the snapshot is older than its base copy"
    elif wal_damaged:
        why_not = "the WAL is damaged"
    elif not wal.complete:
        why_not = _explain_incomplete(layout, gaps, report, wal, base_lsn)
    if why_not is not None:
        if snap is not None or base is not None:
            report.notes.append(f"the snapshot was not compared with its base copy and the "
                                f"WAL: {why_not}")
        for opened in (snap, base):
            if opened is not None:
                for _ in opened.entries():
                    pass
    found: list[str] = []
    if why_not is None:
        assert snap is not None
        found = _compare(snap, base, wal, base_lsn)
    for opened in (snap, base):
        if opened is not None:
            _report_file(opened.check, report)
    report.snapshot_entries = snap.check.entries if snap is not None else 0
    report.base_entries = base.check.entries if base is not None else 0
    if snap is not None:
        path = snap.check.path
        for message in found[:MAX_LISTED_PROBLEMS]:
            report.damage.append(Damage.of(CorruptionError(message, path=path,
                                                           hint=REPAIR_HINT)))
        if len(found) > MAX_LISTED_PROBLEMS:
            report.damage.append(Damage(
                f"... and {len(found) - MAX_LISTED_PROBLEMS} more keys where the snapshot "
                f"differs from its base copy and the WAL ({path})", path, None, None))


def _explain_incomplete(layout: StoreLayout, gaps: list[tuple[int, int]],
                        report: VerifyReport, wal: WalOps, base_lsn: int) -> str:
    """Why the WAL does not hold every record between the base and the snapshot:
    a known hole, a store changed under verify (not damage), or lost segments."""
    missing = wal.missing()
    if all(gap_allowed(gaps, lo, hi) for lo, hi in missing):
        return f"LSNs {_ranges(missing)} are a known hole in the log"
    if base_lsn and read_base_lsn(layout) != base_lsn:
        return "a checkpoint replaced the base copy while verify ran"
    if not base_lsn:
        return (f"there is no base copy and the WAL does not hold LSNs {_ranges(missing)} "
                "(the next open for writing makes a base)")
    tail = [r for r in missing if r[1] == wal.upto]
    if tail and tail_may_be_torn(layout):
        return (f"the WAL lost LSNs {_ranges(tail)} that the snapshot holds (written, never "
                "synced, before a crash); the next open records them as a hole")
    first = missing[0]
    report.damage.append(Damage(
        f"the WAL lacks LSNs {_ranges(missing)} between the base copy (LSN {base_lsn}) and the "
        f"snapshot (LSN {report.applied_lsn}): the base and the WAL cannot rebuild the "
        f"snapshot ({layout.wal_dir}, LSN {first[0]})", str(layout.wal_dir), None, first[0]))
    return "the WAL lacks records between them"


def _ranges(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"{lo}..{hi}" if lo != hi else str(lo) for lo, hi in ranges)


GONE = object()


def _merged(
    older: Iterator[tuple[bytes, bytes | None]], newer: dict[bytes, bytes],
) -> Iterator[tuple[bytes, bytes | None]]:
    """``older``'s keys and entries in key order, with ``newer`` written over them."""
    overlay = sorted(newer.items())
    i = 0
    for key, entry in older:
        while i < len(overlay) and overlay[i][0] < key:
            yield overlay[i]
            i += 1
        if i < len(overlay) and overlay[i][0] == key:
            yield overlay[i]
            i += 1
        else:
            yield key, entry
    yield from overlay[i:]


def joined(
    a: Iterator[tuple[bytes, bytes | None]], b: Iterator[tuple[bytes, bytes | None]],
) -> Iterator[tuple[bytes, object, object]]:
    """Both sorted streams side by side: (key, a's entry or GONE, b's entry or GONE)."""
    end = (b"", GONE)
    x = next(a, end)
    y = next(b, end)
    while x is not end or y is not end:
        if y is end or (x is not end and x[0] < y[0]):
            yield x[0], x[1], GONE
            x = next(a, end)
        elif x is end or y[0] < x[0]:
            yield y[0], GONE, y[1]
            y = next(b, end)
        else:
            yield x[0], x[1], y[1]
            x = next(a, end)
            y = next(b, end)


def _tombstones_only(entry: bytes) -> bool:
    try:
        return all(s.data is None for s in decode_entry(entry))
    except CorruptionError:
        return False


def _compare(snap: CheckedFile, base: CheckedFile | None, wal: WalOps,
             base_lsn: int) -> list[str]:
    """base + WAL against the snapshot, key by key (both files are checked on the
    way): what differs."""
    source = (f"its base copy (LSN {base_lsn}) and the WAL" if base is not None
              else "the WAL from LSN 1")
    older: Iterator[tuple[bytes, bytes | None]] = base.entries() if base is not None else iter(())
    found: list[str] = []
    for key, expected, actual in joined(_merged(older, wal.entries), snap.entries()):
        if expected is None or actual is None:
            continue  # a damaged value: the file's own check names it
        if actual is GONE:
            assert isinstance(expected, bytes)
            if not _tombstones_only(expected):  # a compaction may drop tombstones
                found.append(f"key {key_text(key)} is missing from the snapshot, though "
                             f"{source} hold it")
        elif expected is GONE:
            found.append(f"the snapshot holds key {key_text(key)}, which neither {source} hold")
        elif expected != actual:
            found.append(f"the snapshot entry of key {key_text(key)} differs from what {source} "
                         "leave for it")
    expected_meta = {name: value for name, value in (base.check.meta if base is not None
                                                     else {}).items()
                     if name.startswith(META_OP_PREFIX)}
    expected_meta.update(wal.meta)
    actual_meta = {name: value for name, value in snap.check.meta.items()
                   if name.startswith(META_OP_PREFIX)}
    damaged = snap.check.damaged_meta | (base.check.damaged_meta if base is not None else set())
    for name in sorted(expected_meta.keys() | actual_meta.keys()):
        if expected_meta.get(name) != actual_meta.get(name) and name not in damaged:
            found.append(f"the snapshot's metadata entry {key_text(name)} differs from what "
                         f"{source} leave for it")
    return found


def _report_file(check: FileCheck, report: VerifyReport) -> None:
    for problem in check.problems:
        report.damage.append(Damage.of(problem))
    if check.problems_not_listed:
        report.damage.append(Damage(
            f"... and {check.problems_not_listed} more damaged values ({check.path})",
            check.path, None, None))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
