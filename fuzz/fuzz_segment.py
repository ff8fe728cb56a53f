"""Fuzz target: ``engine.wal.scan_segment`` on arbitrary segment bytes.

Contract: scan_segment returns a SegmentScan or raises a ``WalsyncError``
(CorruptionError and its subclasses); any other exception is a bug. Each
input is scanned as a sealed segment (``is_last=False``) and as the last one
(``is_last=True``), with and without ``skip_below_lsn``, and then again with
every checksum made right (the header's, and each frame's as far as the
length fields chain), so that mutations reach the LSN, version and
torn-tail-versus-corruption logic instead of stopping at the first checksum.

What a clean result must satisfy:

* the kept frames are back to back from the header, with consecutive LSNs
  from ``first_lsn`` (those below ``skip_below_lsn`` checked but not kept);
* ``last_lsn`` is the last LSN checked, ``end_offset`` where they end;
* a torn tail only in the last segment, and it covers the rest of the file;
  without one, what follows the frames is zeros only (space preallocated and
  never written), and a segment without a valid header is accepted only as
  the last one, when it is torn or all zeros;
* every kept frame's payload goes through ``decode_payload`` under the same
  contract.

Run: ``python fuzz/fuzz_segment.py -max_total_time=600 /tmp/seg-corpus fuzz/corpus/segment``
"""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

from _harness import engine_imports, run

with engine_imports(__name__ == "__main__"):
    import xxhash

    from walsync.engine.errors import WalsyncError
    from walsync.engine.record import FRAME_HEADER_BYTES, SEGMENT_HEADER_BYTES, decode_payload
    from walsync.engine.wal import SegmentScan, scan_segment

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_PATH = Path("fuzz-segment.wal")  # never read: the bytes are passed as data=


def first_lsn_of(data: bytes) -> int:
    """The LSN the header claims (what the file name would say), or 1."""
    return _U64.unpack_from(data, 16)[0] if len(data) >= 24 else 1


def fix_checksums(data: bytes) -> bytes:
    """The segment with its header checksum and its frames' checksums made right."""
    buf = bytearray(data)
    if len(buf) >= SEGMENT_HEADER_BYTES:
        buf[24:32] = _U64.pack(xxhash.xxh3_64_intdigest(bytes(buf[:24])))
    offset = SEGMENT_HEADER_BYTES
    while len(buf) - offset >= FRAME_HEADER_BYTES:
        (length,) = _U32.unpack_from(buf, offset + 12)
        stop = offset + FRAME_HEADER_BYTES + length
        if stop > len(buf):
            break
        digest = xxhash.xxh3_64_intdigest(bytes(buf[offset + 8 : stop]))
        buf[offset : offset + 8] = _U64.pack(digest)
        offset = stop
    return bytes(buf)


def _all_zero(data: bytes) -> bool:
    return data.count(0) == len(data)


def check_scan(data: bytes, first_lsn: int, is_last: bool, skip_below_lsn: int = 0) -> None:
    try:
        scan = scan_segment(
            _PATH, first_lsn, is_last=is_last, skip_below_lsn=skip_below_lsn, data=data
        )
    except WalsyncError:
        return
    check_result(scan, data, first_lsn, is_last, skip_below_lsn)


def check_result(
    scan: SegmentScan, data: bytes, first_lsn: int, is_last: bool, skip_below_lsn: int
) -> None:
    assert scan.first_lsn == first_lsn
    if not is_last:
        assert scan.torn is None, "torn tail reported for a sealed segment"
    end = scan.end_offset
    assert 0 <= end <= len(data), end
    if end == 0:  # no valid header: a torn header, or a preallocated file never written
        assert is_last, "a sealed segment without a valid header was accepted"
        assert scan.frames == []
        assert scan.last_lsn == first_lsn - 1
        if scan.torn is not None:
            assert scan.torn.offset == 0
            assert scan.torn.bytes_cut == len(data)
        else:
            assert _all_zero(data), "a header-less segment with data is neither torn nor empty"
        return
    assert end >= SEGMENT_HEADER_BYTES
    checked = scan.last_lsn - first_lsn + 1
    assert checked >= 0, (scan.last_lsn, first_lsn)
    expected_lsns = [
        lsn for lsn in range(first_lsn, scan.last_lsn + 1) if lsn >= skip_below_lsn
    ]
    assert [f.lsn for f in scan.frames] == expected_lsns
    for frame in scan.frames:
        assert frame.offset >= SEGMENT_HEADER_BYTES
        assert frame.offset + frame.size <= end
        assert data[frame.offset + FRAME_HEADER_BYTES : frame.offset + frame.size] == frame.payload
    if skip_below_lsn <= first_lsn and scan.frames:
        offset = SEGMENT_HEADER_BYTES
        for frame in scan.frames:
            assert frame.offset == offset, "frames are not back to back"
            offset += frame.size
        assert offset == end
    if scan.torn is not None:
        assert scan.torn.offset == end
        assert scan.torn.bytes_cut == len(data) - end
        assert scan.torn.first_lost_lsn == scan.last_lsn + 1
    else:
        # what follows the frames can only be preallocated space, never written
        assert _all_zero(data[end:]), "the scan stops early without a torn tail"
    for frame in scan.frames:
        with contextlib.suppress(WalsyncError):
            decode_payload(frame.payload, str(_PATH), frame.offset, frame.lsn)


def test_one_input(data: bytes) -> None:
    first = first_lsn_of(data)
    fixed = fix_checksums(data)
    for buf in (data, fixed) if fixed != data else (data,):
        for is_last in (False, True):
            check_scan(buf, first, is_last)
        check_scan(buf, first, True, skip_below_lsn=first + 1)
    if first != 1:
        check_scan(fixed, 1, True)  # a file name that disagrees with the header


if __name__ == "__main__":
    run(test_one_input)
