"""Write the seed corpora fuzz/corpus/<target>/ with the real encoder.

    python fuzz/make_corpus.py          # (re)write the seed files
    python fuzz/make_corpus.py --check  # exit 1 if a seed file is missing or stale

Deterministic: the same engine writes the same bytes, so the files can be
committed and ``test_fuzz_bounded.py`` checks that they are current. Each
input is small (the whole corpus is a few KB): a valid example of each shape
and the interesting near-misses (another format version with a valid
checksum, a torn tail, damage that a later frame vouches for, an LSN gap).
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import cbor2
import xxhash

from walsync.engine.export import ExportHeader, ExportWriter
from walsync.engine.record import (
    CODEC_NONE,
    KIND_LOCAL,
    KIND_MERGE,
    SEGMENT_HEADER_BYTES,
    compress_value,
    encode_entry,
    encode_frame,
    encode_payload,
    encode_segment_header,
)
from walsync.engine.versions import Sibling, Version

CORPUS = Path(__file__).resolve().parent / "corpus"
TARGETS = ("frame", "segment", "payload", "export")
HLC = 1_700_000_000_000 << 16


def _sibling(node: str, lsn: int, value: object, vv: dict[str, int] | None = None) -> Sibling:
    data = None if value is None else cbor2.dumps(value)
    version = Version(node, lsn, HLC + lsn, vv or {node: lsn}, 0, data is None)
    return Sibling(version, CODEC_NONE, data)


def _with_checksum(frame: bytes) -> bytes:
    return struct.pack("<Q", xxhash.xxh3_64_intdigest(frame[8:])) + frame[8:]


def _frame_version(frame: bytes, version: int) -> bytes:
    """The frame as another format version would write it (checksum valid)."""
    return _with_checksum(frame[:10] + bytes([version]) + frame[11:])


def _flip(buf: bytes, index: int) -> bytes:
    return buf[:index] + bytes([buf[index] ^ 0x01]) + buf[index + 1 :]


def build() -> dict[str, dict[str, bytes]]:
    """{target: {file name: bytes}}."""
    plain = _sibling("node-a", 3, {"step": "fetch", "attempt": 1, "ok": True})
    codec, packed = compress_value(cbor2.dumps("walsync " * 800), 3)
    assert codec != CODEC_NONE
    zipped = Sibling(Version("node-a", 4, HLC + 4, {"node-a": 4}), codec, packed)
    tombstone = _sibling("node-a", 5, None)
    left = _sibling("node-a", 6, "left", {"node-a": 6})
    right = _sibling("node-b", 2, "right", {"node-b": 2})

    local = encode_payload(
        KIND_LOCAL, HLC + 3, [["run/1", encode_entry([plain])], ["blob", encode_entry([zipped])]]
    )
    merge = encode_payload(KIND_MERGE, HLC + 6, [["run/1", encode_entry([left, right])]])
    delete = encode_payload(KIND_LOCAL, HLC + 5, [["run/1", encode_entry([tombstone])]])
    empty_ops = encode_payload(KIND_LOCAL, HLC, [])

    payload = {
        "payload_local": local,
        "payload_merge": merge,
        "payload_delete": delete,
        "payload_no_ops": empty_ops,
        "entry_siblings": encode_entry([left, right]),
        "entry_tombstone": encode_entry([tombstone]),
        "value_plain": cbor2.dumps({"step": "fetch", "tags": ["a", "b"], "n": -1, "f": 1.5}),
        "value_zstd": packed,
    }

    f_local = encode_frame(7, 6, local)
    f_merge = encode_frame(8, 7, merge)
    frame = {
        "frame_local": f_local,
        "frame_merge": f_merge,
        "frame_empty_payload": encode_frame(1, 0, b""),
        "frame_version_2": _frame_version(f_local, 2),
        "frame_truncated": f_local[:-5],
        "frame_bad_checksum": _flip(f_local, 40),
        "two_frames": f_local + f_merge,
    }

    header = encode_segment_header(1)
    f1 = encode_frame(1, 0, delete)
    f2 = encode_frame(2, 0, local)
    f3 = encode_frame(3, 2, merge)
    f3_vouching = encode_frame(3, 3, merge)  # says LSN 2 was synced before it was written
    bad_header = header[:8] + struct.pack("<H", 2) + header[10:24]
    segment = {
        "header_only": header,
        "three_frames": header + f1 + f2 + f3,
        "torn_tail": header + f1 + f2 + f3[:-3],
        "damage_unvouched": header + f1 + _flip(f2, 40) + f3,
        "damage_vouched": header + f1 + _flip(f2, 40) + f3_vouching,
        "lsn_gap": header + f1 + f3,
        "frame_version_2": header + f1 + _frame_version(f2, 2),
        "segment_version_2": bad_header + struct.pack("<Q", xxhash.xxh3_64_intdigest(bad_header)),
        "header_torn": header[: SEGMENT_HEADER_BYTES - 5],
        "first_lsn_9": encode_segment_header(9) + encode_frame(9, 8, empty_ops),
        "preallocated_tail": header + f1 + bytes(96),
        "preallocated_empty": bytes(SEGMENT_HEADER_BYTES + 16),
    }

    store_scope = ExportHeader("node-a", "store", "", 1_700_000_000_000, 9)
    valid = _export(store_scope, [("blob", zipped), ("run/1", left), ("run/1", right),
                                  ("run/2", tombstone)])
    version_2 = bytearray(valid)
    version_2[8] = 2
    export = {
        "export_store": valid,
        "export_empty": _export(ExportHeader("node-b", "prefix", "none/", 1, 0), []),
        "export_run": _export(ExportHeader("node-a", "run", "r1", 2, 3),
                              [("index/runs/r1", plain), ("runs/r1", plain)]),
        "export_flipped": _flip(valid, 60),
        "export_truncated": valid[:-11],
        "export_trailing_byte": valid + b"\x00",
        "export_version_2": _fix_export(bytes(version_2)),
        "export_bad_value": _export(store_scope, [("k", Sibling(plain.version, 1, b"junk"))]),
    }
    return {"frame": frame, "segment": segment, "payload": payload, "export": export}


def _export(header: ExportHeader, records: list[tuple[str, Sibling]]) -> bytes:
    chunks: list[bytes] = []
    writer = ExportWriter(chunks.append, header)
    for key, sibling in records:
        writer.add(key, sibling)
    writer.finish()
    return b"".join(chunks)


def _fix_export(data: bytes) -> bytes:
    """An export with its checksums made right after an edit (see fuzz_export.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fuzz_export import fix_checksums

    return fix_checksums(data)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for target, files in build().items():
        folder = CORPUS / target
        for name, data in files.items():
            path = folder / name
            if check:
                if not path.is_file() or path.read_bytes() != data:
                    stale.append(str(path))
                continue
            folder.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    if stale:
        print("stale or missing seed files (run python fuzz/make_corpus.py):", *stale, sep="\n  ")
        return 1
    if not check:
        total = sum(len(d) for files in build().values() for d in files.values())
        print(f"wrote {sum(len(f) for f in build().values())} seed files, {total} bytes, "
              f"under {CORPUS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
