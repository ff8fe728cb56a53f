"""Recovery on open: bring the snapshot up to the end of the WAL.

Why this is safe to run any number of times, and after a crash in itself:
the snapshot stores its applied LSN in the same LMDB transaction as the data,
so replay starts from exactly the first record the snapshot lacks, and a
record applied twice is impossible. Local records carry the snapshot entry
they produce; merge records are deterministic given the state before them,
and that state is the same on every replay because records apply in LSN
order.

What is checked: every segment from the one holding ``applied + 1`` to the
end — frame checksums, LSN continuity inside and across segments (holes that
`repair` recorded in the STORE file are allowed). Older segments are left to
`verify`, so opening stays fast.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cbor2

from . import _fs
from .base import SnapshotRebuild, read_base_lsn
from .errors import CorruptionError, LSNGapError
from .layout import StoreLayout
from .record import FRAME_HEADER_BYTES, KIND_LOCAL, KIND_MERGE, decode_payload
from .snapshot import SnapshotStore
from .snapshot.seal import REPAIR_HINT
from .wal import SegmentScan, TornTail, iter_frames, scan_segment

__all__ = [
    "LogStep",
    "RecoveryReport",
    "describe_torn_tail",
    "gap_allowed",
    "recover",
    "tail_may_be_torn",
    "walk_log",
]

log = logging.getLogger("walsync.replay")

#: a replay transaction commits after this many records or frame bytes,
#: whichever comes first (LMDB keeps a transaction's dirty pages in memory)
_TXN_RECORDS = 131072
_TXN_BYTES = 32 << 20
_KINDS = (KIND_LOCAL, KIND_MERGE)


@dataclass(frozen=True)
class RecoveryReport:
    """What open found and did. A torn tail is reported here, not raised."""

    applied_lsn_before: int
    replayed_records: int
    last_lsn: int
    torn_tail: TornTail | None
    segments_read: int
    seconds: float
    #: LSNs the snapshot holds but the WAL lost (only after a power loss with
    #: durability 'none'), or LSNs a repair reserved and the WAL does not hold:
    #: recorded as a known hole so the log stays checkable
    wal_hole: tuple[int, int] | None = None
    #: set when the snapshot was not trusted (the machine went down with the
    #: store open) and was rebuilt from its base
    snapshot_rebuilt: SnapshotRebuild | None = None

    @property
    def records_per_second(self) -> float:
        return self.replayed_records / self.seconds if self.seconds > 0 else 0.0


def gap_allowed(gaps: list[tuple[int, int]], first_missing: int, last_missing: int) -> bool:
    return any(lo <= first_missing and last_missing <= hi for lo, hi in gaps)


def tail_may_be_torn(layout: StoreLayout) -> bool:
    """The one rule open, verify and repair apply to damage at the end of the log.

    Only a writer that died with the store open (its OPEN marker is still
    there) can have left a torn tail: records it wrote but never synced, so
    never acknowledged, which open cuts. After a clean close every record was
    synced and acknowledged: a damaged last record is damage to acknowledged
    data, which open refuses, verify reports and repair moves aside. (A
    writer's open asks before it writes its own marker.)
    """
    return not layout.closed_cleanly()


def describe_torn_tail(torn: TornTail) -> str:
    """How open (its log), verify and repair word a torn tail."""
    return (f"torn tail: {torn.bytes_cut} bytes at offset {torn.offset} of {torn.segment} "
            f"(from LSN {torn.first_lost_lsn}, never acknowledged; cut on open)")


@dataclass
class LogStep:
    """One step of :func:`walk_log`: a segment checked, or damage found."""

    index: int
    first_lsn: int
    path: Path
    #: the segment's scan (None when ``error`` is about this segment's contents)
    scan: SegmentScan | None = None
    #: decoded records ``(lsn, kind, hlc, ops)``, when asked for
    records: list[tuple[int, int, int, list[tuple[str, bytes]]]] | None = None
    #: damage: an LSN gap before this segment (``gap``), or damage inside it
    error: CorruptionError | None = None
    gap: bool = False


def walk_log(
    layout: StoreLayout, gaps: list[tuple[int, int]], *, decode: bool = True,
    may_be_torn: bool | None = None,
) -> Iterator[LogStep]:
    """Check every segment in log order, as verify and repair read the log.

    Yields a step per segment (with an error when it is damaged; a gap in the
    LSNs before a segment comes as a step of its own, then the segment). The
    last segment may end in a torn tail only if :func:`tail_may_be_torn`
    (``may_be_torn`` overrides it). A segment of another format version comes
    as a step with a FormatVersionError: verify reports it, repair refuses.
    """
    if may_be_torn is None:
        may_be_torn = tail_may_be_torn(layout)
    segments = layout.list_segments()
    prev_last: int | None = None
    for i, (first, path) in enumerate(segments):
        if prev_last is not None and first != prev_last + 1 and not gap_allowed(
            gaps, prev_last + 1, first - 1
        ):
            yield LogStep(i, first, path, error=LSNGapError(
                f"LSN gap: this segment starts at {first}, the previous one ends at "
                f"{prev_last}", path=str(path), offset=0, lsn=prev_last + 1), gap=True)
        try:
            scan = scan_segment(path, first, is_last=i == len(segments) - 1 and may_be_torn)
            records = None
            if decode:
                records = []
                for frame in scan.frames:
                    kind, hlc, ops = decode_payload(frame.payload, str(path), frame.offset,
                                                    frame.lsn)
                    records.append((frame.lsn, kind, hlc, ops))
                    frame.payload = b""  # decoded: the ops hold what is needed
        except CorruptionError as exc:
            yield LogStep(i, first, path, error=exc)
            prev_last = None
            continue
        yield LogStep(i, first, path, scan=scan, records=records)
        prev_last = scan.last_lsn


def recover(
    layout: StoreLayout,
    snapshot: SnapshotStore,
    gaps: list[tuple[int, int]],
    min_next_lsn: int = 1,
    *,
    closed_cleanly: bool = False,
) -> tuple[RecoveryReport, SegmentScan | None, int]:
    """Replay; return the report, the scan of the segment to append to, and the next LSN.

    ``min_next_lsn`` (set by repair) keeps LSNs that were lost from the log
    from ever being handed out again. ``closed_cleanly`` (the last writer removed
    its OPEN marker: the whole WAL was synced) makes damage in the last segment
    corruption: only a writer that died can have left a torn tail.
    """
    started = time.perf_counter()
    applied = snapshot.applied_lsn()
    segments = layout.list_segments()
    if not segments:
        base_lsn = read_base_lsn(layout)
        if applied < base_lsn:
            # the snapshot reads as older than the copy made of it (a damaged page
            # made LMDB fall back to an older transaction) and no WAL bridges the
            # two: opening would hand out LSNs the base already holds
            raise LSNGapError(
                f"the snapshot holds up to LSN {applied}, below its base copy's LSN "
                f"{base_lsn}, and the WAL holds no records: records {applied + 1}.."
                f"{base_lsn} are missing from the snapshot",
                path=snapshot.data_file, lsn=applied + 1, hint=REPAIR_HINT,
            )
        next_lsn = max(applied + 1, min_next_lsn)
        skipped = (applied + 1, next_lsn - 1) if next_lsn > applied + 1 else None
        report = RecoveryReport(
            applied, 0, next_lsn - 1, None, 0, time.perf_counter() - started, skipped
        )
        return report, None, next_lsn

    start = 0
    for i, (first, _path) in enumerate(segments):
        if first <= applied + 1:
            start = i
    first_needed = segments[start][0]
    if first_needed > applied + 1 and not gap_allowed(gaps, applied + 1, first_needed - 1):
        raise LSNGapError(
            f"the WAL begins at LSN {first_needed} but the snapshot holds only up to LSN "
            f"{applied}: records {applied + 1}..{first_needed - 1} are missing",
            path=str(segments[start][1]),
            lsn=applied + 1,
        )

    may_be_torn = not closed_cleanly
    replayed = 0
    prev_last: int | None = None
    scan: SegmentScan | None = None
    gc_was_enabled = gc.isenabled()
    # Replay allocates millions of short-lived objects and keeps none: the
    # cyclic GC would only rescan the survivors (the segment buffer, the
    # pending puts) again and again.
    gc.disable()
    try:
        for i in range(start, len(segments)):
            first, path = segments[i]
            is_last = i == len(segments) - 1 and may_be_torn
            if prev_last is not None and first != prev_last + 1 and not gap_allowed(
                gaps, prev_last + 1, first - 1
            ):
                raise LSNGapError(
                    f"segment starts at LSN {first} but the previous one ends at LSN {prev_last}",
                    path=str(path),
                    offset=0,
                    lsn=prev_last + 1,
                )
            scan, count = _replay_segment(snapshot, path, first, is_last, applied + 1)
            replayed += count
            prev_last = scan.last_lsn
    finally:
        if gc_was_enabled:
            gc.enable()

    assert scan is not None
    assert prev_last is not None
    if scan.torn is not None:
        _cut_tail(layout, scan)
    elif scan.empty_preallocated:
        # renamed into place but never written to: nothing was lost
        _fs.unlink(scan.path)
        _fs.fsync_dir(layout.wal_dir)
    wal_last = prev_last
    hole = None
    active: SegmentScan | None = scan if scan.end_offset > 0 else None
    applied_now = snapshot.applied_lsn()
    if wal_last < applied_now:
        # The snapshot reached disk with records whose WAL bytes did not.
        log.warning("WAL lost LSNs %d..%d that the snapshot holds", wal_last + 1, applied_now)
    next_lsn = max(wal_last + 1, applied_now + 1, min_next_lsn)
    if next_lsn != wal_last + 1:
        # Not in the log: LSNs the snapshot holds whose WAL bytes were lost, and
        # LSNs a repair reserved. A known hole; the next record starts a new
        # segment after it.
        hole = (wal_last + 1, next_lsn - 1)
        active = None
    report = RecoveryReport(
        applied, replayed, next_lsn - 1, scan.torn, len(segments) - start,
        time.perf_counter() - started, hole,
    )
    return report, active, next_lsn


def _replay_segment(
    snapshot: SnapshotStore, path: Path, first_lsn: int, is_last: bool, from_lsn: int
) -> tuple[SegmentScan, int]:
    """Check one segment and apply its records from ``from_lsn`` on, as they are read.

    Records go to LMDB in large transactions, each moving the applied LSN
    with its data; a record is applied only after every frame before it
    checked out. Damage found further on raises after the records before it
    were applied (they are intact and in order, so the state stays consistent
    and a second open or a repair carries on from there).
    """
    data = path.read_bytes()
    name = str(path)
    scan = SegmentScan(path, first_lsn)
    view = memoryview(data)
    loads = cbor2.loads
    puts: list[tuple[bytes, bytes]] = []
    append = puts.append
    meta_ops = False
    pending = pending_bytes = 0
    last_lsn = max_hlc = 0
    replayed = 0
    for lsn, offset, size in iter_frames(data, path, first_lsn, scan, is_last=is_last):
        if lsn < from_lsn:
            continue
        p = offset + FRAME_HEADER_BYTES
        end = offset + size
        if (end - p > 16 and data[p] == 0x83 and data[p + 1] <= 1 and data[p + 2] == 0x1B
                and data[p + 11] == 0x81 and data[p + 12] == 0x82):
            # The common shape, a record of one put, ``[kind, hlc(u64), [[key, entry]]]``
            # as cbor2 writes it: the key's and the entry's bytes are sliced out where
            # they lie, nothing else is decoded. Any other head falls through.
            head = data[p + 13]
            if 0x61 <= head <= 0x77:
                key_at, key_len = p + 14, head - 0x60
            elif head == 0x78:
                key_at, key_len = p + 15, data[p + 14]
            elif head == 0x79:
                key_at, key_len = p + 16, int.from_bytes(data[p + 14 : p + 16], "big")
            else:
                key_at = key_len = 0
            key_end = key_at + key_len
            if key_len and key_end < end:
                head = data[key_end]
                if 0x40 <= head <= 0x57:
                    entry_at, entry_len = key_end + 1, head - 0x40
                elif head == 0x58:
                    entry_at, entry_len = key_end + 2, data[key_end + 1]
                elif head == 0x59:
                    entry_at = key_end + 3
                    entry_len = int.from_bytes(data[key_end + 1 : key_end + 3], "big")
                elif head == 0x5A:
                    entry_at = key_end + 5
                    entry_len = int.from_bytes(data[key_end + 1 : key_end + 5], "big")
                else:
                    entry_at = entry_len = -1
                if entry_at + entry_len == end:
                    raw_key = data[key_at:key_end]
                    try:
                        raw_key.decode()  # a CBOR text string is UTF-8, as decoding checks
                    except UnicodeDecodeError:
                        pass  # decode_payload below gives the verdict
                    else:
                        hlc = int.from_bytes(data[p + 3 : p + 11], "big")
                        append((raw_key, data[entry_at:end]))
                        if hlc > max_hlc:
                            max_hlc = hlc
                        last_lsn = lsn
                        pending += 1
                        pending_bytes += size
                        if pending >= _TXN_RECORDS or pending_bytes >= _TXN_BYTES:
                            snapshot.apply_puts(puts, last_lsn, max_hlc, meta_ops=meta_ops)
                            replayed += pending
                            puts.clear()
                            pending = pending_bytes = 0
                            meta_ops = False
                        continue
        try:
            # Any other shape of one put, checked inline; anything else (several
            # operations, a meta op, or a decode error) is left to
            # decode_payload for the exact verdict. Nothing is kept before
            # every check passed.
            record = loads(view[offset + FRAME_HEADER_BYTES : offset + size])
            kind, hlc, ops = record
            if (
                type(record) is not list or kind not in _KINDS or type(hlc) is not int
                or type(ops) is not list or len(ops) != 1
            ):
                raise ValueError
            op = ops[0]
            key, entry = op
            if type(op) is not list or type(key) is not str or type(entry) is not bytes or not key:
                raise ValueError
            append((key.encode(), entry))
        except Exception:  # noqa: BLE001 - decode_payload raises the right error, or accepts
            payload = data[offset + FRAME_HEADER_BYTES : offset + size]
            _kind, hlc, checked = decode_payload(payload, name, offset, lsn)
            for key, entry in checked:
                meta_ops = meta_ops or not key
                append((key.encode(), entry))
        if hlc > max_hlc:
            max_hlc = hlc
        last_lsn = lsn
        pending += 1
        pending_bytes += size
        if pending >= _TXN_RECORDS or pending_bytes >= _TXN_BYTES:
            snapshot.apply_puts(puts, last_lsn, max_hlc, meta_ops=meta_ops)
            replayed += pending
            puts.clear()
            pending = pending_bytes = 0
            meta_ops = False
    if pending:
        snapshot.apply_puts(puts, last_lsn, max_hlc, meta_ops=meta_ops)
        replayed += pending
    return scan, replayed


def _cut_tail(layout: StoreLayout, scan: SegmentScan) -> None:
    torn = scan.torn
    assert torn is not None
    log.warning("%s", describe_torn_tail(torn))
    if torn.offset == 0:
        _fs.unlink(scan.path)
        _fs.fsync_dir(layout.wal_dir)
        return
    fd = _fs.open_segment(scan.path, create=False)
    try:
        _fs.truncate(fd, torn.offset)
        _fs.fsync(fd)
    finally:
        os.close(fd)
