"""Export files: a run, a key prefix or a whole store in one portable, self-checking file.

(Over 500 lines: the writer and the reader of one file format, EXPORT.md, and the two
calls over them; the reader's checks of a damaged file are the bulk.) A run's scope is
the workflow layer's (engine/workflow/export.py): the store never reads run keys.

An export carries every key's stored siblings, tombstones included, with
their versions (vector, HLC, origin, LSN, fence). The importing store merges
them by the same version-vector rules as a pull, so a later sync converges
instead of conflicting, and importing a file twice changes nothing.

Why the file checks itself: it travels (copied between hosts, kept as a
backup), and a damaged one must be refused before it touches a store. Each
record is framed with its size and an XXH3-64 checksum like a WAL frame; a
trailer holds the counts, and the last 8 bytes hash the whole file, so a
flipped byte, a cut, or a lost, duplicated or reordered record is caught.
The byte layout is EXPORT.md beside this file.

Why an import is all or nothing: the file is verified in full first, in one
streaming pass with bounded memory, then read again and written as ONE merge
record through the WAL (``Store.apply_remote``). A crash leaves that record
whole (replayed on open) or cut as a torn tail, never half. An import that
does not fit in one record (``MAX_PAYLOAD_BYTES``) is refused before anything
is written: export smaller scopes (runs, prefixes) and import them in turn.

Threads: the functions take a Store that other threads may use meanwhile; an
ExportReader or ExportWriter belongs to one thread.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import cbor2
import xxhash

from . import _failpoints, _fs
from .errors import (
    CapacityError,
    ExportFormatError,
    InvalidKeyError,
    ReadOnlyStoreError,
    StoreClosedError,
    WalsyncError,
)
from .record import CODEC_NONE, CODEC_ZSTD, MAX_PAYLOAD_BYTES, decode_value
from .store import Store
from .versions import Sibling

__all__ = [
    "EXPORT_MAGIC",
    "EXPORT_VERSION",
    "FILE_CHECKSUM_BYTES",
    "FRAME_HEADER_BYTES",
    "HEADER_PREFIX_BYTES",
    "KIND_RECORD",
    "KIND_TRAILER",
    "MAX_HEADER_BODY_BYTES",
    "MAX_KEY_BYTES",
    "SCOPES",
    "TRAILER_PAYLOAD_BYTES",
    "ExportHeader",
    "ExportReader",
    "ExportScope",
    "ExportSummary",
    "ExportWriter",
    "ImportReport",
    "Progress",
    "count_scope_keys",
    "export_file",
    "import_file",
    "verify_export_file",
    "write_export",
]

EXPORT_MAGIC = b"walsyncX"
EXPORT_VERSION = 1
#: magic, format version, flags, header body size
_HEADER_PREFIX = struct.Struct("<8sHHI")
HEADER_PREFIX_BYTES = _HEADER_PREFIX.size
MAX_HEADER_BODY_BYTES = 1 << 16
#: checksum, kind, flags, reserved, payload size
_FRAME_HEADER = struct.Struct("<QBBHI")
_FRAME_FIELDS = struct.Struct("<BBHI")
FRAME_HEADER_BYTES = _FRAME_HEADER.size
KIND_RECORD = 1
KIND_TRAILER = 2
#: records, keys, value bytes
_TRAILER = struct.Struct("<QQQ")
TRAILER_PAYLOAD_BYTES = _TRAILER.size
FILE_CHECKSUM_BYTES = 8
#: LMDB's key limit, the largest any store accepts
MAX_KEY_BYTES = 511
SCOPES = ("store", "prefix", "run")

_U64 = struct.Struct("<Q")
_xxh3 = xxhash.xxh3_64_intdigest
#: integers in versions must fit a signed 64-bit column (the sync server's bigint)
_INT_LIMIT = 1 << 63
#: buffered output is written in pieces of about this size
_FLUSH_BYTES = 1 << 20
#: progress is reported every this many keys (export) or bytes (reading)
_PROGRESS_KEYS = 1000
_PROGRESS_BYTES = 1 << 20

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ExportHeader:
    """Where an export came from: the source node, the scope and when."""

    node_id: str
    #: "store", "prefix" or "run"
    scope: str
    #: the prefix or the run id; "" for a whole store
    scope_value: str
    created_unix_ms: int
    #: the source store's applied LSN when the export began
    source_applied_lsn: int

    def encode(self) -> bytes:
        return cbor2.dumps({
            "node_id": self.node_id,
            "scope": self.scope,
            "scope_value": self.scope_value,
            "created_unix_ms": self.created_unix_ms,
            "source_applied_lsn": self.source_applied_lsn,
        })


@dataclass(frozen=True)
class ExportSummary:
    """What an export file holds, once every byte of it checked out."""

    path: str
    header: ExportHeader
    #: siblings (one record each, tombstones included)
    records: int
    keys: int
    #: the stored (possibly compressed) bytes of every value
    value_bytes: int
    #: the payload bytes of every record: about the size of the import's one WAL record
    record_bytes: int
    file_bytes: int
    #: the whole-file XXH3-64 from the end of the file
    checksum: int


@dataclass(frozen=True)
class ImportReport:
    path: str
    source_node: str
    scope: str
    scope_value: str
    records: int
    keys: int
    value_bytes: int
    file_bytes: int
    #: the LSN of the merge record written; None when every version was already there
    lsn: int | None
    seconds: float


# -- writing -------------------------------------------------------------------


class ExportWriter:
    """Encodes an export into ``write`` as records are added; ``finish`` ends it.

    Keys must come in key order (a key's siblings one after the other), as a
    store's scan yields them: the reader checks the order, which makes a
    misplaced record detectable and the key count exact.
    """

    def __init__(self, write: Callable[[bytes], object], header: ExportHeader) -> None:
        if header.scope not in SCOPES:
            raise ValueError(f"export scope must be one of {SCOPES}, not {header.scope!r}")
        self._write = write
        self._hash = xxhash.xxh3_64()
        self._buf = bytearray()
        self._last_key: str | None = None
        self.records = 0
        self.keys = 0
        self.value_bytes = 0
        self.record_bytes = 0
        self.file_bytes = 0
        #: the whole-file checksum, once finished
        self.checksum: int | None = None
        body = header.encode()
        head = _HEADER_PREFIX.pack(EXPORT_MAGIC, EXPORT_VERSION, 0, len(body)) + body
        self._emit(head + _U64.pack(_xxh3(head)))

    def add(self, key: str, sibling: Sibling) -> None:
        if self._last_key is not None and key < self._last_key:
            raise ValueError(f"export keys must come in order: {key!r} after {self._last_key!r}")
        if key != self._last_key:
            self.keys += 1
            self._last_key = key
        payload = cbor2.dumps([key, sibling.to_wire()])
        self._frame(KIND_RECORD, payload)
        self.records += 1
        self.value_bytes += len(sibling.data or b"")
        self.record_bytes += len(payload)

    def finish(self) -> None:
        """Write the trailer and the whole-file checksum, and flush."""
        self._frame(KIND_TRAILER, _TRAILER.pack(self.records, self.keys, self.value_bytes))
        self.checksum = self._hash.intdigest()
        self._buf += _U64.pack(self.checksum)
        self.file_bytes += FILE_CHECKSUM_BYTES
        self._flush()

    def _frame(self, kind: int, payload: bytes) -> None:
        fields = _FRAME_FIELDS.pack(kind, 0, 0, len(payload))
        digest = xxhash.xxh3_64(fields)
        digest.update(payload)
        self._emit(_U64.pack(digest.intdigest()) + fields)
        self._emit(payload)

    def _emit(self, data: bytes) -> None:
        self._hash.update(data)
        self.file_bytes += len(data)
        if len(data) >= _FLUSH_BYTES:  # a large value: written as it is, not copied
            self._flush()
            self._write(data)
            return
        self._buf += data
        if len(self._buf) >= _FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            self._write(bytes(self._buf))
            self._buf.clear()


@dataclass(frozen=True)
class ExportScope:
    """What an export covers: the scope its header names and the keys it reads.

    The store knows two scopes of its own (the whole store, a key prefix); a layer
    above it names its own keys through ``sources`` (the workflow layer's run export,
    ``walsync.engine.workflow.export_run``), so the store never reads their grammar.
    """

    #: one of SCOPES
    kind: str
    #: the prefix or the run id; "" for a whole store
    value: str
    #: (key, exact): that one key, or every key under it as a prefix; given in key
    #: order and never overlapping, so the keys come out in key order
    sources: tuple[tuple[str, bool], ...]

    @classmethod
    def of(cls, prefix: str | None = None) -> ExportScope:
        """The whole store, or every key under ``prefix``."""
        if prefix:
            return cls("prefix", prefix, ((prefix, False),))
        return cls("store", "", (("", False),))


def export_file(
    store: Store,
    path: str | os.PathLike[str],
    *,
    prefix: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportSummary:
    """Write the whole store, or the keys under ``prefix``, to ``path``.

    One run: ``walsync.engine.workflow.export_run``. See ``write_export``.
    """
    return write_export(store, path, ExportScope.of(prefix), overwrite=overwrite,
                        progress=progress)


def count_scope_keys(store: Store, scope: ExportScope) -> int:
    """How many keys an export of ``scope`` would hold now."""
    return sum(_count_keys(store, key, exact) for key, exact in scope.sources)


def write_export(
    store: Store,
    path: str | os.PathLike[str],
    scope: ExportScope,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportSummary:
    """Write the keys of ``scope`` with every stored sibling to ``path``.

    Keys are read in chunks of 1000, each chunk from one snapshot; export keys
    nobody writes meanwhile for an exact picture of them. The file is written
    beside ``path`` as a dot-prefixed ``.tmp``, fsynced and renamed into place, so
    ``path`` never holds a partial export.
    ``progress(keys_done, keys_total)`` is called as keys are written.
    """
    if scope.kind not in SCOPES:
        raise ValueError(f"export scope must be one of {SCOPES}, not {scope.kind!r}")
    sources = list(scope.sources)
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(errno.EEXIST, "export file exists (pass overwrite=True)", str(target))
    total = count_scope_keys(store, scope)
    header = ExportHeader(store.node_id, scope.kind, scope.value, int(time.time() * 1000),
                          store.applied_lsn)
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        _fs.unlink(tmp)
    fd = _fs.open_append(tmp)
    finished = False
    try:
        writer = ExportWriter(lambda data: _fs.writev(fd, [data]), header)
        done = 0
        for key, siblings in _iter_scope(store, sources):
            for sibling in siblings:
                writer.add(key, sibling)
            done += 1
            if progress is not None and done % _PROGRESS_KEYS == 0:
                progress(done, max(total, done))
        writer.finish()
        _fs.fsync(fd)
        if _failpoints.ACTIVE:
            _failpoints.hit("export.before_rename")
        finished = True
    finally:
        os.close(fd)
        if not finished:
            _fs.unlink(tmp)
    _fs.rename(tmp, target)
    _fs.fsync_dir(target.parent)
    if progress is not None:
        progress(done, max(total, done))
    assert writer.checksum is not None
    return ExportSummary(str(target), header, writer.records, writer.keys, writer.value_bytes,
                         writer.record_bytes, writer.file_bytes, writer.checksum)


def _count_keys(store: Store, key: str, exact: bool) -> int:
    """How many keys an export source holds (for progress): a prefix's keys are
    counted without decoding their entries."""
    if exact:
        return sum(1 for _ in _iter_scope(store, [(key, True)]))
    return store.count_keys(key)


def _iter_scope(
    store: Store, sources: list[tuple[str, bool]]
) -> Iterator[tuple[str, list[Sibling]]]:
    """Keys with their stored siblings: exact keys, or every key under a prefix.

    Sources are given in key order and do not overlap, so the keys come out in
    key order.
    """
    for key, exact in sources:
        if not exact:
            yield from store.iter_siblings(key)
            continue
        # the first key under ``key`` is ``key`` itself, if it exists
        for found, siblings in store.iter_siblings(key, chunk_keys=1):
            if found == key:
                yield found, siblings
            break


# -- reading -------------------------------------------------------------------


class ExportReader:
    """Reads an export from a binary stream, checking every byte as it goes.

    The header is read on construction; :meth:`records` yields ``(key,
    Sibling)`` pairs and, once exhausted, has checked the trailer and the
    whole-file checksum and set :attr:`summary`. Memory is bounded by the
    largest record. Anything that does not check out raises
    :class:`ExportFormatError` naming the file and the offset where the
    failing item starts; records already yielded must then be discarded.
    ``check_values`` also decodes every value (decompressed and CBOR-read).
    """

    def __init__(self, stream: BinaryIO, *, name: str, size: int,
                 check_values: bool = True, progress: Progress | None = None) -> None:
        self.name = name
        self.size = size
        self.summary: ExportSummary | None = None
        self._stream = stream
        self._check_values = check_values
        self._progress = progress
        self._reported = 0
        self._pos = 0
        self._hash = xxhash.xxh3_64()
        self.header = self._read_header()

    def _error(self, message: str, offset: int, hint: str | None = None) -> ExportFormatError:
        return ExportFormatError(f"export file {message}", path=self.name, offset=offset,
                                 hint=hint)

    def _take(self, n: int, start: int, what: str) -> bytes:
        """The next ``n`` bytes, hashed; a file ending first is a truncation at ``start``."""
        if n > self.size - self._pos:
            raise self._error(
                f"is truncated: it ends at byte {self.size}, inside {what}", start
            )
        data = self._stream.read(n)
        if len(data) != n:
            raise self._error(f"ended while it was read (at byte {self._pos + len(data)}, "
                              f"inside {what})", start)
        self._hash.update(data)
        self._pos += n
        return data

    def _read_header(self) -> ExportHeader:
        first = self._stream.read(min(self.size, HEADER_PREFIX_BYTES))
        if not EXPORT_MAGIC.startswith(first[: len(EXPORT_MAGIC)]):
            raise self._error("is not a walsync export (bad magic)", 0)
        if len(first) < HEADER_PREFIX_BYTES:
            raise self._error(f"is truncated: it ends at byte {len(first)}, inside the header", 0)
        self._hash.update(first)
        self._pos = HEADER_PREFIX_BYTES
        _magic, version, flags, body_bytes = _HEADER_PREFIX.unpack(first)
        if version != EXPORT_VERSION:
            raise self._version_error(version, body_bytes)
        if body_bytes > MAX_HEADER_BODY_BYTES:
            raise self._error(f"header declares {body_bytes} bytes, above the "
                              f"{MAX_HEADER_BODY_BYTES} a header may have", 12)
        body = self._take(body_bytes, 0, "the header")
        head_hash = self._hash.intdigest()
        stored = self._stream_u64(0, "the header")
        if stored != head_hash:
            raise self._error("header checksum mismatch", 0)
        if flags != 0:
            raise self._error(f"header has unknown flags {flags:#x}", 10)
        try:
            fields = cbor2.loads(body)
            if not isinstance(fields, dict):
                raise ValueError("not a map")
            header = ExportHeader(
                node_id=_text(fields["node_id"], "node_id"),
                scope=_text(fields["scope"], "scope"),
                scope_value=_text(fields["scope_value"], "scope_value", empty=True),
                created_unix_ms=_uint(fields["created_unix_ms"], "created_unix_ms"),
                source_applied_lsn=_uint(fields["source_applied_lsn"], "source_applied_lsn"),
            )
            if header.scope not in SCOPES:
                raise ValueError(f"unknown scope {header.scope!r}")
        except (ValueError, TypeError, KeyError, cbor2.CBORDecodeError, RecursionError) as exc:
            raise self._error(f"header does not decode: {_describe(exc)}",
                              HEADER_PREFIX_BYTES) from None
        return header

    def _version_error(self, version: int, body_bytes: int) -> ExportFormatError:
        """Another version's file, or a damaged version field: the header checksum,
        where version 1 keeps it, tells them apart (another version may keep it
        elsewhere, so a mismatch names both possibilities)."""
        intact = False
        if body_bytes <= MAX_HEADER_BODY_BYTES and self.size >= self._pos + body_bytes + 8:
            body = self._stream.read(body_bytes + 8)
            self._hash.update(body[:body_bytes])
            intact = _U64.unpack(body[body_bytes:])[0] == self._hash.intdigest()
        if intact:
            return self._error(
                f"has export format version {version}, which this walsync does not read: it "
                f"reads version {EXPORT_VERSION}", 8,
                hint=f"import it with a walsync that reads export format version {version}",
            )
        return self._error(
            f"names export format version {version} and its header does not check out as "
            f"version {EXPORT_VERSION}'s: it is damaged, or another walsync wrote it", 8)

    def _stream_u64(self, start: int, what: str) -> int:
        return int(_U64.unpack(self._take(8, start, what))[0])

    def records(self) -> Iterator[tuple[str, Sibling]]:
        records = keys = value_bytes = record_bytes = 0
        last_key: str | None = None
        while True:
            start = self._pos
            if start == self.size:
                raise self._error(f"is truncated: it ends at byte {start}, before its trailer",
                                  start)
            head = self._take(FRAME_HEADER_BYTES, start, "the frame that starts here")
            checksum, kind, flags, reserved, length = _FRAME_HEADER.unpack(head)
            if length > self.size - self._pos:
                raise self._error(
                    f"is truncated or damaged: the frame that starts here declares {length} "
                    f"payload bytes, past the end of the file at byte {self.size}", start)
            payload = self._take(length, start, "the frame that starts here")
            digest = xxhash.xxh3_64(head[8:])
            digest.update(payload)
            if digest.intdigest() != checksum:
                raise self._error("frame checksum mismatch", start)
            if flags or reserved:
                raise self._error(f"frame has unknown flags {flags:#x}/{reserved:#x}", start)
            if kind == KIND_TRAILER:
                break
            if kind != KIND_RECORD:
                raise self._error(f"has a frame of unknown kind {kind}", start)
            key, sibling = self._decode_record(payload, start)
            if last_key is not None and key < last_key:
                raise self._error(f"keys out of order: {key!r} after {last_key!r}", start)
            if key != last_key:
                keys += 1
                last_key = key
            records += 1
            value_bytes += len(sibling.data or b"")
            record_bytes += length
            self._report()
            yield key, sibling
        if length != TRAILER_PAYLOAD_BYTES:
            raise self._error(f"trailer holds {length} bytes, not {TRAILER_PAYLOAD_BYTES}", start)
        claimed = _TRAILER.unpack(payload)
        found = (records, keys, value_bytes)
        for label, said, seen in zip(("records", "keys", "value bytes"), claimed, found,
                                     strict=True):
            if said != seen:
                raise self._error(f"trailer says {said} {label}, the file holds {seen}", start)
        whole = self._hash.intdigest()
        end = self._pos
        stored = int(_U64.unpack(self._take_unhashed(end))[0])
        if stored != whole:
            raise self._error("checksum of the whole file mismatch (records lost, added, "
                              "reordered or changed)", end)
        if self._pos != self.size:
            raise self._error(f"has {self.size - self._pos} bytes after its end", self._pos)
        self._report(final=True)
        self.summary = ExportSummary(self.name, self.header, records, keys, value_bytes,
                                     record_bytes, self.size, stored)

    def _take_unhashed(self, start: int) -> bytes:
        if self.size - self._pos < FILE_CHECKSUM_BYTES:
            raise self._error(f"is truncated: it ends at byte {self.size}, inside the checksum "
                              "of the whole file", start)
        data = self._stream.read(FILE_CHECKSUM_BYTES)
        if len(data) != FILE_CHECKSUM_BYTES:
            raise self._error("ended while it was read (inside the checksum of the whole "
                              "file)", start)
        self._pos += FILE_CHECKSUM_BYTES
        return data

    def _decode_record(self, payload: bytes, start: int) -> tuple[str, Sibling]:
        try:
            item = cbor2.loads(payload)
            if not isinstance(item, list) or len(item) != 2:
                raise ValueError("not a [key, sibling] array")
            key, wire = item
            if type(key) is not str or not key:
                raise ValueError("the key is not a non-empty string")
            if len(key.encode()) > MAX_KEY_BYTES:
                raise ValueError(f"key {key[:40]!r}... is longer than {MAX_KEY_BYTES} bytes")
            sibling = _sibling(wire)
        except (ValueError, TypeError, KeyError, cbor2.CBORDecodeError, RecursionError) as exc:
            raise self._error(f"record does not decode: {_describe(exc)}", start) from None
        if self._check_values and sibling.data is not None:
            try:
                decode_value(sibling.codec, sibling.data)
            except WalsyncError as exc:
                raise self._error(f"value of key {key!r} does not decode: {exc}", start) from None
        return key, sibling

    def _report(self, final: bool = False) -> None:
        if self._progress is not None and (final or self._pos - self._reported >= _PROGRESS_BYTES):
            self._reported = self._pos
            self._progress(self._pos, self.size)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc)


def _text(value: Any, what: str, *, empty: bool = False) -> str:
    if type(value) is not str or (not value and not empty):
        raise ValueError(f"{what} is not a{'' if empty else ' non-empty'} string")
    return value


def _uint(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value < _INT_LIMIT:
        raise ValueError(f"{what} is not an integer in 0..2^63-1")
    return value


def _sibling(wire: Any) -> Sibling:
    """A sibling from its wire form, every field checked (a tombstone: data null)."""
    if not isinstance(wire, list) or len(wire) != 7:
        raise ValueError("a sibling is not a 7-element array")
    data, codec, vv, hlc, origin, lsn, fence = wire
    if data is not None and type(data) is not bytes:
        raise ValueError("a value is neither bytes nor null")
    if type(codec) is not int or codec not in (CODEC_NONE, CODEC_ZSTD):
        raise ValueError(f"unknown value codec {codec!r}")
    if not isinstance(vv, dict):
        raise ValueError("a version vector is not a map")
    clean = {_text(node, "a version vector's node"): _uint(n, "a version vector's counter")
             for node, n in vv.items()}
    return Sibling.from_wire([data, codec, clean, _uint(hlc, "hlc"), _text(origin, "origin"),
                              _uint(lsn, "lsn"), _uint(fence, "fence")])


def _open(path: str | os.PathLike[str], **options: Any) -> tuple[BinaryIO, ExportReader]:
    stream = open(path, "rb")  # noqa: SIM115 - closed by the caller
    try:
        size = os.fstat(stream.fileno()).st_size
        return stream, ExportReader(stream, name=str(path), size=size, **options)
    except BaseException:
        stream.close()
        raise


def verify_export_file(
    path: str | os.PathLike[str], *, progress: Progress | None = None
) -> ExportSummary:
    """Check every byte of an export (checksums, counts, order, each value decodes).

    One streaming pass, memory bounded by the largest record. Raises
    ExportFormatError naming the file and offset; ``progress(bytes_done,
    bytes_total)``.
    """
    stream, reader = _open(path, progress=progress)
    with stream:
        for _ in reader.records():
            pass
    assert reader.summary is not None
    return reader.summary


def import_file(
    store: Store, path: str | os.PathLike[str], *, progress: Progress | None = None
) -> ImportReport:
    """Load an export into ``store``, all or nothing, keeping every version.

    The file is verified in full first, then read again and written as one
    merge record (``Store.apply_remote``): versions a sibling of the key
    dominates or equals are ignored, concurrent ones are kept as siblings, so
    importing twice changes nothing. Durable (fdatasync'ed) when it returns.
    A damaged file raises ExportFormatError and writes nothing; an import too
    large for one record raises CapacityError and writes nothing.
    ``progress(bytes_done, bytes_total)`` covers both passes.
    """
    started = time.perf_counter()
    if store.readonly:
        raise ReadOnlyStoreError(f"store {store.path} was opened read-only: cannot import")
    if store.closed:
        raise StoreClosedError(f"store {store.path} is closed")
    total = 2 * max(os.stat(path).st_size, 1)

    def verifying(done: int, _size: int) -> None:
        if progress is not None:
            progress(done, total)

    def loading(done: int, size: int) -> None:
        if progress is not None:
            progress(size + done, total)

    summary = verify_export_file(path, progress=verifying)
    if summary.record_bytes > MAX_PAYLOAD_BYTES:
        raise CapacityError(
            f"export {path} holds {summary.record_bytes} bytes of records, above the "
            f"{MAX_PAYLOAD_BYTES} bytes one WAL record may hold: an import is one record, so "
            "that it is all or nothing; nothing was written",
            hint="export smaller parts (--run RUN_ID or --prefix PREFIX) and import each",
        )
    if _failpoints.ACTIVE:
        _failpoints.hit("export.import_verified")
    max_key_bytes = store.options.max_key_bytes
    items: list[tuple[str, Sibling]] = []
    stream, reader = _open(path, check_values=False, progress=loading)
    with stream:
        for key, sibling in reader.records():
            if len(key.encode()) > max_key_bytes:
                raise InvalidKeyError(
                    f"key {key[:40]!r}... in {path} is longer than this store's max_key_bytes "
                    f"({max_key_bytes}); nothing was written")
            items.append((key, sibling))
    if reader.summary != summary:
        raise ExportFormatError("export file changed while it was imported; nothing was "
                                "written", path=str(path))
    if _failpoints.ACTIVE:
        _failpoints.hit("export.import_loaded")
    result = store.apply_remote(items) if items else None
    header = summary.header
    return ImportReport(
        str(path), header.node_id, header.scope, header.scope_value, summary.records,
        summary.keys, summary.value_bytes, summary.file_bytes,
        None if result is None else result.lsn, time.perf_counter() - started,
    )
