"""The LMDB side: the current siblings of every key, and the applied LSN.

The only module that imports ``lmdb``. LMDB runs without its own fsync
(``sync=False``): the WAL is the source of truth, every record is applied only
after its WAL bytes were written (and, for durable commits, synced), and the
applied LSN is stored in the same LMDB transaction as the data it covers, so
after a crash replay starts exactly where the snapshot ends. A checkpoint
(``sync``) makes the snapshot durable up to its applied LSN, which lets the
WAL below it be removed. No ``writemap``: other processes read the file.

Thread rules: any thread may read; one thread at a time applies (the
group-commit leader or replay). The map grows by itself when it is full;
growing needs every transaction of this process closed, so reads and writes
pass a gate that the resize waits on.

Every value in both tables is *sealed*: an XXH3-64 checksum of the entry,
seeded with the checksum of its key, precedes the entry's bytes (FORMAT.md,
snapshot format 2). LMDB checks nothing of what it stores, and a flipped bit
in a page would otherwise come back as another value, or the value of another
key. Every read opens the seal and refuses what does not match with a
CorruptionError naming the key and the file; LMDB's own errors on a damaged
file become the same. A snapshot written before seals existed (format 1) is
sealed by the first writer that opens it, in one transaction.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import lmdb
import xxhash

from . import _fs
from .errors import CapacityError, CorruptionError, FormatVersionError, StoreStateError
from .record import decode_entry

log = logging.getLogger("walsync.snapshot")

__all__ = [
    "SNAPSHOT_FORMAT_VERSION",
    "AppliedRecord",
    "SnapshotStore",
    "entry_checksum",
    "seal",
    "unseal",
]

_DATA_DB = b"data"
_META_DB = b"meta"
_APPLIED_LSN = b"applied_lsn"
_HLC = b"hlc"
#: meta-table names set by records' meta ops start with this
META_OP_PREFIX = b"record/"
#: the metadata entries a rebuilt snapshot must carry (repair)
APPLIED_LSN_NAME = _APPLIED_LSN
HLC_NAME = _HLC

#: the snapshot format this code writes and reads (FORMAT.md, "Snapshot entry")
SNAPSHOT_FORMAT_VERSION = 2
#: meta-table entry holding the snapshot format (absent: format 1, values unsealed)
_FORMAT = b"format"
#: the keys whose entry holds more than one sibling (value: empty), kept in the
#: transaction that writes the entry: listing conflicts costs what they are
_CONFLICTS_DB = b"conflicts"
#: meta entry: the conflicts table covers every entry (absent: a snapshot written
#: before the table existed; its next writer's open builds it)
_CONFLICTS_BUILT = b"conflicts_built"
#: a sealed value: this checksum, then the entry
_SEAL = struct.Struct("<Q")
SEAL_BYTES = _SEAL.size
_seal_pack = _SEAL.pack
_seal_unpack = _SEAL.unpack_from
_xxh3 = xxhash.xxh3_64_intdigest

#: a repair's load commits a transaction at about this many bytes
_LOAD_BYTES = 32 << 20

#: what to do about a damaged snapshot entry
REPAIR_HINT = (
    "run `walsync verify` to list the damage, then `walsync repair`: it rebuilds the "
    "snapshot from its base copy and the WAL, and names any key it cannot rebuild "
    "(bring those back from the sync server: `walsync restore --to NEW --prefix KEY`, "
    "then `walsync export` there and `walsync import` here)"
)

#: LMDB errors that say nothing about the file's pages (every other one met while
#: reading means they are not what LMDB wrote)
_NOT_DAMAGE: tuple[type[lmdb.Error], ...] = (
    lmdb.MapResizedError, lmdb.ReadersFullError, lmdb.BadRslotError, lmdb.TlsFullError,
    lmdb.MemoryError,
)


#: LMDB errors a write meets on a file whose pages are damaged
_DAMAGE_ON_WRITE: tuple[type[lmdb.Error], ...] = (
    lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError, lmdb.IncompatibleError,
    lmdb.BadValsizeError,
)


def entry_checksum(key: bytes, entry: bytes | memoryview) -> int:
    """The checksum that seals ``entry`` under ``key``: XXH3-64 of the entry, seeded
    with XXH3-64 of the key, so an entry read under another key fails it too."""
    return _xxh3(entry, _xxh3(key))


def seal(key: bytes, entry: bytes | list[bytes]) -> bytes:
    """The value LMDB stores for ``entry`` (given whole, or in parts that are
    hashed in place and joined once)."""
    if isinstance(entry, bytes):
        return _seal_pack(_xxh3(entry, _xxh3(key))) + entry
    h = xxhash.xxh3_64(seed=_xxh3(key))
    for part in entry:
        h.update(part)
    return b"".join([_seal_pack(h.intdigest()), *entry])


def unseal(key: bytes, raw: bytes | memoryview) -> bytes | None:
    """The entry a sealed value holds, or None if its checksum does not match."""
    if len(raw) < SEAL_BYTES:
        return None
    entry = bytes(raw[SEAL_BYTES:])
    if _seal_unpack(raw)[0] != _xxh3(entry, _xxh3(key)):
        return None
    return entry


def key_text(key: bytes) -> str:
    """A key as an error message names it."""
    try:
        return repr(key.decode())
    except UnicodeDecodeError:
        return repr(key)


def _holds_siblings(entry: bytes | list[bytes]) -> bool:
    """Whether an entry holds more than one sibling, from its CBOR array head alone
    (0x80 + n for n < 24; an entry in parts is a single sibling's)."""
    return type(entry) is bytes and entry[:1] not in (b"\x80", b"\x81")

#: (lsn, kind, hlc, ops) — a decoded WAL record ready to apply
AppliedRecord = tuple[int, int, int, Sequence[Sequence[Any]]]
#: a snapshot entry, whole or in parts (a large value kept apart from its framing)
Entry = bytes | list[bytes]


class _Gate:
    """Many transactions at once, or one map resize alone."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self._resizing = False
        self._shared = _SharedHold(self)

    def shared(self) -> _SharedHold:
        """``with gate.shared():`` holds the gate shared (a plain object, not a
        generator: every commit passes here twice)."""
        return self._shared

    def _enter_shared(self) -> None:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._active += 1

    def _exit_shared(self) -> None:
        with self._cond:
            self._active -= 1
            if self._active == 0 and self._resizing:
                self._cond.notify_all()  # exclusive() waits for the last one out

    @contextmanager
    def exclusive(self, timeout_seconds: float = 60.0) -> Iterator[None]:
        deadline = time.monotonic() + timeout_seconds
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._resizing = True
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._resizing = False
                    self._cond.notify_all()
                    raise CapacityError(
                        "the LMDB map is full and cannot grow while read transactions stay "
                        "open in this process",
                        hint="close read views (Store.snapshot()) before committing from the "
                        "same thread, or open the store with a larger map_size_bytes",
                    )
                self._cond.wait(left)
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


class _SharedHold:
    __slots__ = ("_gate",)

    def __init__(self, gate: _Gate) -> None:
        self._gate = gate

    def __enter__(self) -> None:
        self._gate._enter_shared()

    def __exit__(self, *exc: object) -> None:
        self._gate._exit_shared()


#: (pairs, last LSN, highest HLC, whether a pair is a meta op): apply_puts' arguments
ApplyPuts = tuple[Sequence[tuple[bytes, Entry]], int, int, bool]


class ApplyAhead:
    """An apply filled on a helper thread, committed or aborted on the caller's word."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._decision: bool | None = None
        self._done = False
        #: why filling or committing failed (nothing was applied then); an LMDB
        #: failure comes as the OSError it stands for, naming the file
        self.error: BaseException | None = None
        #: the failure was a full map (the caller applies the usual way, which
        #: grows it); any other failure must poison the store
        self.map_full = False
        self.committed = False

    def finish(self, commit: bool) -> None:
        """Commit (the records are durable) or abort, and wait until it is done."""
        with self._cond:
            self._decision = commit
            self._cond.notify_all()
            while not self._done:
                self._cond.wait()

    def wait_decision(self) -> bool:
        with self._cond:
            while self._decision is None:
                self._cond.wait()
            return self._decision

    def set_done(self) -> None:
        with self._cond:
            self._done = True
            self._cond.notify_all()


class EntryWriter:
    """Puts entries into a write transaction of the data table, sealed (and keeps
    the conflicts table in step)."""

    def __init__(self, txn: lmdb.Transaction, conflicts: Any = None) -> None:
        self._txn = txn
        self._conflicts = conflicts

    def put(self, key: bytes, entry: bytes) -> None:
        self._txn.put(key, seal(key, entry))
        if self._conflicts is not None:
            if _holds_siblings(entry):
                self._txn.put(key, b"", db=self._conflicts)
            else:
                self._txn.delete(key, db=self._conflicts)

    def delete(self, key: bytes) -> None:
        self._txn.delete(key)
        if self._conflicts is not None:
            self._txn.delete(key, db=self._conflicts)


class SnapshotUninitialisedError(StoreStateError):
    """A read-only open found an LMDB environment whose tables were never created."""


class SnapshotStore:
    def __init__(self, path: Path, *, map_size_bytes: int, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._map_size_bytes = map_size_bytes
        if not readonly:
            _finish_compaction(path)
            _fs.make_dir(path)
        created = not readonly and not (path / "data.mdb").exists()
        self.env = self._open_env()
        if created:
            # LMDB made its files just now and never syncs a directory: without
            # this, a power loss after a checkpoint or a clean close could lose
            # the file's name while the WAL below it is gone
            try:
                _fs.fsync_dir(path)
            except BaseException:
                self.env.close()  # a leaked handle would refuse every later open
                raise
        self.env.reader_check()
        try:
            check_length(self.env, path / "data.mdb")
        except BaseException:
            self.env.close()
            raise
        try:
            self._data = self.env.open_db(_DATA_DB, create=not readonly)
            self._meta = self.env.open_db(_META_DB, create=not readonly)
        except lmdb.NotFoundError:
            self.env.close()
            raise SnapshotUninitialisedError(
                f"the snapshot {path} has no tables yet: its creation was cut short",
                hint="open the store for writing once; it creates them and replays the WAL",
            ) from None
        except lmdb.Error as exc:
            self.env.close()
            raise CorruptionError(f"LMDB cannot open the snapshot's tables: {exc}",
                                  path=str(path / "data.mdb"), hint=REPAIR_HINT) from None
        self._gate = _Gate()
        self._ahead: ThreadPoolExecutor | None = None
        self.data_file = str(path / "data.mdb")
        #: no value can be longer than the file (a damaged length would make a
        #: read run off the map); raised from LMDB's page count when one is
        self._longest = max(self.file_bytes(), 1 << 20)
        try:
            self._check_format()
            #: the conflicts table may hold keys (true until a transaction saw it empty)
            self._conflicts_listed = True
            self._conflicts = self._open_conflicts(build=not readonly)
        except BaseException:
            self.env.close()
            raise

    def _check_format(self) -> None:
        """Refuse a snapshot of another format; a writer seals a format-1 snapshot."""
        try:
            with self.env.begin(buffers=False) as txn:
                raw = txn.get(_FORMAT, db=self._meta)
                empty = (int(txn.stat(self._data)["entries"]) == 0
                         and int(txn.stat(self._meta)["entries"]) == 0)
        except lmdb.Error as exc:
            raise self._read_error(exc, _FORMAT) from exc
        if raw is not None:
            value = unseal(_FORMAT, raw)
            if value is None:
                raise self._damaged(_FORMAT, "meta", "fails its checksum")
            version = int.from_bytes(value, "little")
            if version != SNAPSHOT_FORMAT_VERSION:
                raise FormatVersionError(
                    f"snapshot format version {version} is not supported by this walsync, "
                    f"which reads version {SNAPSHOT_FORMAT_VERSION}", path=self.data_file)
            return
        if self.readonly:
            if empty:
                return  # a new environment, its writer about to mark it
            raise FormatVersionError(
                "snapshot format version 1 (entries without checksums) is not read by this "
                f"walsync, which reads version {SNAPSHOT_FORMAT_VERSION}", path=self.data_file,
                hint="open the store for writing once: the writer adds the checksums "
                "(a one-time rewrite of the snapshot)")
        self._write("format upgrade", lambda: self._seal_format_1(empty))

    def _seal_format_1(self, empty: bool) -> None:
        """Seal every value of a format-1 snapshot and mark it format 2, in one
        transaction: a crash before its commit leaves format 1, sealed again next time.

        An entry is sealed only if it decodes as an entry (a format-1 file had no
        other check), and a value that is sealed already means the format entry
        itself was lost: neither is sealed over, both are damage.
        """
        sealed = 0
        with self.env.begin(write=True, db=self._data) as txn:
            try:
                for db, table in ((self._data, "data"), (self._meta, "meta")):
                    if empty:
                        break
                    cur = txn.cursor(db=db)
                    for raw_key, raw in cur:
                        key, value = bytes(raw_key), bytes(raw)
                        if unseal(key, value) is not None:
                            raise self._damaged(
                                key, table, "carries a checksum but the snapshot has no "
                                "format entry: that entry is damaged")
                        if table == "data":
                            try:
                                decode_entry(value)
                            except CorruptionError as exc:
                                raise self._damaged(
                                    key, table, f"(format 1, written without a checksum) "
                                    f"does not decode: {exc}") from None
                        cur.put(key, seal(key, value))
                        sealed += 1
                version = SNAPSHOT_FORMAT_VERSION.to_bytes(4, "little")
                txn.put(_FORMAT, seal(_FORMAT, version), db=self._meta)
            except lmdb.MapFullError:
                raise
            except lmdb.Error as exc:
                raise self._read_error(exc, None) from exc
        if sealed:
            log.info("snapshot %s: sealed %d values (format 1 to %d)", self.path, sealed,
                     SNAPSHOT_FORMAT_VERSION)

    def _open_env(self) -> lmdb.Environment:
        path, readonly = self.path, self.readonly
        try:
            return lmdb.open(
                str(path),
                map_size=self._map_size_bytes,
                subdir=True,
                readonly=readonly,
                create=not readonly,
                max_dbs=4,
                sync=False,
                metasync=False,
                writemap=False,
                map_async=False,
                readahead=False,
                lock=True,
                mode=_fs.FILE_MODE,
            )
        except lmdb.Error as exc:
            if "already open in this process" in str(exc):
                # not damage: LMDB allows one handle per environment and process
                raise StoreStateError(
                    f"the snapshot {path} is already open in this process",
                    hint="share the open Store handle; open a second one (even read-only) "
                    "from another process",
                ) from None
            raise CorruptionError(f"cannot open the LMDB snapshot: {exc}", path=str(path)) from None

    # -- reads ---------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A consistent read transaction; keep it short-lived."""
        with self._gate.shared():
            txn = self._begin_read()
            try:
                yield txn
            finally:
                txn.abort()

    def _begin_read(self) -> lmdb.Transaction:
        # buffers: values are views of the map, checked before a byte is copied
        try:
            try:
                return self.env.begin(db=self._data, buffers=True)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
                return self.env.begin(db=self._data, buffers=True)
        except lmdb.Error as exc:
            raise self._read_error(exc, None) from exc

    def get_entry(self, key: bytes) -> bytes | None:
        """The entry of ``key`` (its checksum checked), or None."""
        with self._gate.shared():
            txn = self._begin_read()
            try:
                return self.entry_in(txn, key)
            finally:
                txn.abort()

    def entry_in(self, txn: lmdb.Transaction, key: bytes) -> bytes | None:
        """:meth:`get_entry` inside a read transaction of :meth:`read`."""
        try:
            raw = txn.get(key)
            if raw is None:
                self._confirm_absent(txn, key)
                return None
        except lmdb.Error as exc:
            raise self._read_error(exc, key) from exc
        return self._opened(key, raw, "data")

    def _confirm_absent(self, txn: lmdb.Transaction, key: bytes) -> None:
        """A lookup finds its way by the keys in branch pages, which no seal covers:
        one damaged there sends it to the wrong leaf, and a key that is there reads
        as absent. The neighbours a cursor reaches by the pages' links must then
        bracket the key; if they do not, that is damage, not an absent key."""
        cur = txn.cursor(db=self._data)
        if cur.set_range(key):
            if bytes(cur.key()) <= key:
                raise self._misrouted(key)
            if cur.prev() and bytes(cur.key()) >= key:
                raise self._misrouted(key)
        elif cur.last() and bytes(cur.key()) >= key:
            raise self._misrouted(key)

    def _misrouted(self, key: bytes) -> CorruptionError:
        return CorruptionError(
            f"looking up key {key_text(key)} in LMDB's tree and walking it disagree: a "
            "branch page of the snapshot is damaged", path=self.data_file, hint=REPAIR_HINT)

    def _opened(self, key: bytes, raw: bytes | memoryview, table: str) -> bytes:
        """The entry of a sealed value read from ``table``; damage raises."""
        if len(raw) > self._longest and not self._plausible(len(raw)):
            raise self._damaged(key, table, f"claims {len(raw)} bytes, more than the file holds")
        if len(raw) >= SEAL_BYTES:
            entry = bytes(raw[SEAL_BYTES:])
            if _seal_unpack(raw)[0] == _xxh3(entry, _xxh3(key)):
                return entry
        raise self._damaged(key, table, "fails its checksum")

    def _plausible(self, size: int) -> bool:
        """Whether a value of ``size`` bytes fits in the pages LMDB has (the bound
        is raised as the file grows)."""
        info = self.env.info()
        self._longest = max(self._longest, (int(info["last_pgno"]) + 1) * self.page_bytes())
        return size <= self._longest

    def page_bytes(self) -> int:
        return int(self.env.stat()["psize"])

    def _damaged(self, key: bytes, table: str, what: str) -> CorruptionError:
        where = "snapshot entry" if table == "data" else "snapshot metadata entry"
        return CorruptionError(f"{where} of key {key_text(key)} {what}", path=self.data_file,
                               hint=REPAIR_HINT)

    def _read_error(self, exc: lmdb.Error, key: bytes | None) -> BaseException:
        """What an LMDB error met while reading stands for: damage to the file
        (naming the key being read), or the error itself when it is not."""
        if isinstance(exc, _NOT_DAMAGE):
            return exc
        at = f" reading key {key_text(key)}" if key is not None else ""
        return CorruptionError(f"LMDB reports a damaged snapshot{at}: {exc}",
                               path=self.data_file, hint=REPAIR_HINT)

    def get_meta(self, name: bytes, txn: lmdb.Transaction | None = None) -> bytes | None:
        """A metadata entry (its checksum checked), or None."""
        if txn is None:
            with self.read() as t:
                return self.get_meta(name, t)
        try:
            raw = txn.get(name, db=self._meta)
        except lmdb.Error as exc:
            raise self._read_error(exc, name) from exc
        return None if raw is None else self._opened(name, raw, "meta")

    def applied_lsn(self) -> int:
        raw = self.get_meta(_APPLIED_LSN)
        return int.from_bytes(raw, "little") if raw else 0

    def last_hlc(self) -> int:
        raw = self.get_meta(_HLC)
        return int.from_bytes(raw, "little") if raw else 0

    def iter_range(
        self, txn: lmdb.Transaction, start: bytes, stop: bytes | None, reverse: bool
    ) -> Iterator[tuple[bytes, bytes]]:
        """Keys in [start, stop) in key order (or reverse), with their entries
        (each checked; keys out of order, which only a damaged tree yields, raise)."""
        prev: bytes | None = None
        key = b""
        try:
            cur = txn.cursor(db=self._data)
            if not reverse:
                if not cur.set_range(start):
                    return
                for raw_key, value in cur:
                    key = bytes(raw_key)
                    if stop is not None and key >= stop:
                        return
                    if prev is not None and key <= prev:
                        raise self._out_of_order(prev, key)
                    prev = key
                    yield key, self._opened(key, value, "data")
                return
            if stop is None:
                positioned = cur.last()
            else:
                positioned = cur.set_range(stop)
                positioned = cur.prev() if positioned else cur.last()
            if not positioned:
                return
            for raw_key, value in cur.iterprev():
                key = bytes(raw_key)
                if key < start:
                    return
                if prev is not None and key >= prev:
                    raise self._out_of_order(prev, key)
                prev = key
                yield key, self._opened(key, value, "data")
        except lmdb.Error as exc:
            raise self._read_error(exc, key or None) from exc

    def _out_of_order(self, prev: bytes, key: bytes) -> CorruptionError:
        return CorruptionError(
            f"LMDB's tree yields key {key_text(key)} after key {key_text(prev)}, out of order: "
            "a page of the snapshot is damaged", path=self.data_file, hint=REPAIR_HINT)

    def count(self) -> int:
        with self.read() as txn:
            return int(txn.stat(self._data)["entries"])

    # -- the conflicts table ---------------------------------------------------

    def iter_conflicts(
        self, txn: lmdb.Transaction, start: bytes, stop: bytes | None
    ) -> Iterator[tuple[bytes, bytes]]:
        """Keys in [start, stop) whose entry holds more than one sibling, in key
        order, with their entries (checked): from the conflicts table, or by reading
        every entry where no writer has built it yet (a reader of an older store)."""
        if self._conflicts is None or self.get_meta(_CONFLICTS_BUILT, txn) is None:
            for key, entry in self.iter_range(txn, start, stop, False):
                if _holds_siblings(entry):
                    yield key, entry
            return
        cur = txn.cursor(db=self._conflicts)
        if not cur.set_range(start):
            return
        for raw_key in cur.iternext(keys=True, values=False):
            key = bytes(raw_key)
            if stop is not None and key >= stop:
                return
            listed = self.entry_in(txn, key)
            if listed is not None and _holds_siblings(listed):
                yield key, listed

    def _open_conflicts(self, *, build: bool = False) -> Any:
        """The conflicts table's handle (None: a reader of a snapshot without it).
        With ``build`` (a writer's open), the table is built first where it is
        missing or incomplete: a snapshot from before it existed. (Reopening the
        environment, under the gate, finds the table as it was.)"""
        try:
            table = self.env.open_db(_CONFLICTS_DB, create=not self.readonly)
        except lmdb.NotFoundError:
            return None
        if build and self.get_meta(_CONFLICTS_BUILT) is None:
            self._write("conflicts table build", lambda: self._build_conflicts(table))
        return table

    def _build_conflicts(self, table: Any) -> None:
        """List every key whose entry holds siblings, in one transaction. An entry
        whose seal fails is listed too: listing it reads it, and says it is damaged."""
        with self.env.begin(write=True, db=self._data) as txn:
            txn.drop(table, delete=False)
            for raw_key, raw in txn.cursor():
                key = bytes(raw_key)
                entry = unseal(key, raw)
                if entry is None or _holds_siblings(entry):
                    txn.put(key, b"", db=table)
            txn.put(_CONFLICTS_BUILT, seal(_CONFLICTS_BUILT, b"\x01"), db=self._meta)

    def _index_conflicts(self, txn: lmdb.Transaction,
                         puts: Iterable[tuple[bytes, bytes | list[bytes]]]) -> None:
        """Keep the conflicts table in step with entries written in ``txn`` (the
        empty key, a record's meta op, is no entry): every entry holding siblings is
        listed. Local writes leave one sibling: while the table is empty (the usual
        case, remembered between transactions) they cost no LMDB call. A key listed
        though its entry no longer holds siblings (left by a transaction that was
        aborted after the table was seen empty) is harmless: readers check the entry."""
        table = self._conflicts
        if table is None:
            return
        listed = self._conflicts_listed
        for key, entry in puts:
            if not key:
                continue
            if _holds_siblings(entry):
                txn.put(key, b"", db=table)
                listed = True
            elif listed:
                txn.delete(key, db=table)
        if listed:
            self._conflicts_listed = int(txn.stat(table)["entries"]) > 0

    # -- writes --------------------------------------------------------------

    def apply(self, records: Sequence[AppliedRecord]) -> None:
        """Apply records in LSN order in one transaction with the new applied LSN."""
        if not records:
            return
        self._write("apply", lambda: self._apply_once(records))

    def _apply_once(self, records: Sequence[AppliedRecord]) -> None:
        last_lsn = records[-1][0]
        hlc = max(r[2] for r in records)
        with self.env.begin(write=True, db=self._data) as txn:
            for _lsn, _kind, _hlc, ops in records:
                for key, entry in ops:
                    if key:
                        raw_key = key.encode()
                        txn.put(raw_key, seal(raw_key, entry))
                    else:
                        self._apply_meta_op(txn, entry)
            self._index_conflicts(txn, ((key.encode(), entry) for _lsn, _kind, _hlc, ops in records
                                        for key, entry in ops))
            self._set_applied(txn, last_lsn, hlc)

    def apply_puts(
        self, puts: Sequence[tuple[bytes, Entry]], last_lsn: int, hlc: int, *, meta_ops: bool
    ) -> None:
        """Apply decoded records' ``(key bytes, entry)`` pairs, in LSN order, in one
        transaction that also moves the applied LSN to ``last_lsn``.

        The bulk form of :meth:`apply` (replay, and the commit path): the same
        rules, with the pairs already flattened and keys encoded. An empty key
        is a meta op; ``meta_ops`` says whether any pair has one (without, the
        pairs go to LMDB in one ``putmulti`` call). An entry may come in parts
        (a large value kept apart): it is sealed and joined here, in one copy.
        """
        self._write("apply", lambda: self._apply_puts_once(puts, last_lsn, hlc, meta_ops))

    def _apply_puts_once(
        self, puts: Sequence[tuple[bytes, Entry]], last_lsn: int, hlc: int, meta_ops: bool
    ) -> None:
        with self.env.begin(write=True, db=self._data) as txn:
            self._fill(txn, puts, last_lsn, hlc, meta_ops)

    def _fill(self, txn: lmdb.Transaction, puts: Sequence[tuple[bytes, Entry]], last_lsn: int,
              hlc: int, meta_ops: bool) -> None:
        """Write the pairs, sealed (the empty key: a record's meta op), and the applied LSN."""
        if not meta_ops:
            # sealing inlined for the common whole entry: replay passes here per record
            pack, xxh3 = _seal_pack, _xxh3
            txn.cursor().putmulti([
                (key, pack(xxh3(entry, xxh3(key))) + entry) if isinstance(entry, bytes)
                else (key, seal(key, entry))
                for key, entry in puts
            ])
        else:
            for key, entry in puts:
                if key:
                    txn.put(key, seal(key, entry))
                else:
                    self._apply_meta_op(txn, entry if isinstance(entry, bytes) else b"".join(entry))
        self._index_conflicts(txn, puts)
        self._set_applied(txn, last_lsn, hlc)

    def apply_ahead(self, build: Callable[[], ApplyPuts]) -> ApplyAhead:
        """Start :meth:`apply_puts` on a helper thread, to commit later.

        The helper builds the pairs (``build()``), opens the write transaction
        and fills it while the caller goes on (writing the WAL: both copy
        large values, and both release the GIL doing it); nothing is visible
        or on disk until the caller's ``finish(commit=True)``, which it gives
        only once the records are durable. If filling fails, ``finish``
        reports the error and the caller applies the usual way. The caller
        must hold the apply stage (no other apply runs meanwhile) and must not
        open a write transaction itself before ``finish``.
        """
        if self._ahead is None:
            self._ahead = ThreadPoolExecutor(1, thread_name_prefix="walsync-apply")
        job = ApplyAhead()
        self._ahead.submit(self._run_ahead, job, build)
        return job

    def _run_ahead(self, job: ApplyAhead, build: Callable[[], ApplyPuts]) -> None:
        try:
            puts, last_lsn, hlc, meta_ops = build()
            with self._gate.shared():
                txn = self.env.begin(write=True, db=self._data)
                try:
                    self._fill(txn, puts, last_lsn, hlc, meta_ops)
                except BaseException:
                    txn.abort()
                    raise
                if job.wait_decision():
                    txn.commit()
                    job.committed = True
                else:
                    txn.abort()
        except lmdb.MapFullError as exc:
            job.error, job.map_full = exc, True
        except lmdb.Error as exc:
            # a failed page or meta-page write may leave the handle refusing every
            # later transaction (MDB_PANIC): reads go on from a fresh one
            with self._gate.exclusive():
                self._reopen_env()
            job.error = self._os_error(exc, "apply")
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            job.error = exc
        finally:
            job.set_done()

    def _set_applied(self, txn: lmdb.Transaction, last_lsn: int, hlc: int) -> None:
        txn.put(_APPLIED_LSN, seal(_APPLIED_LSN, last_lsn.to_bytes(8, "little")), db=self._meta)
        old = self.get_meta(_HLC, txn)
        if old is None or int.from_bytes(old, "little") < hlc:
            txn.put(_HLC, seal(_HLC, hlc.to_bytes(8, "little")), db=self._meta)

    def _apply_meta_op(self, txn: lmdb.Transaction, entry: bytes) -> None:
        """The empty key carries store metadata (e.g. sync's pull cursor), see FORMAT.md."""
        for name, value in cbor2.loads(entry).items():
            meta_key = META_OP_PREFIX + name.encode()
            txn.put(meta_key, seal(meta_key, cbor2.dumps(value)), db=self._meta)

    def get_record_meta(self, name: str) -> Any:
        """A value a record's meta op set (None if never set)."""
        raw = self.get_meta(META_OP_PREFIX + name.encode())
        return None if raw is None else cbor2.loads(raw)

    def put_meta(self, name: bytes, value: bytes) -> None:
        def put() -> None:
            with self.env.begin(write=True) as txn:
                txn.put(name, seal(name, value), db=self._meta)

        self._write("meta write", put)

    def _write(self, doing: str, transaction: Callable[[], None]) -> None:
        """Run a write ``transaction``, growing the map while it is full.

        When LMDB fails to write (a page, its meta page) it may refuse every
        later transaction of this handle (MDB_PANIC): the handle is reopened,
        so reads go on from the last commit, and an OSError naming the file is
        raised (the store refuses writes from then on; reopening it replays
        the WAL). LMDB finding the file's pages damaged as it writes (a free
        list pointing nowhere, say) is a CorruptionError instead: reopening
        does not mend that, repair does.
        """
        while True:
            try:
                with self._gate.shared():
                    transaction()
                return
            except lmdb.MapFullError:
                self._grow()
            except lmdb.Error as exc:
                failure = exc
                break
        with self._gate.exclusive():
            self._reopen_env()
        if isinstance(failure, _DAMAGE_ON_WRITE):
            raise CorruptionError(f"LMDB {doing} failed, the snapshot is damaged: {failure}",
                                  path=self.data_file, hint=REPAIR_HINT) from failure
        raise self._os_error(failure, doing) from failure

    def _reopen_env(self) -> None:
        """A fresh LMDB handle, after a failure left this one unusable. The caller
        holds the gate exclusively."""
        with suppress(lmdb.Error):
            self.env.close()
        self.env = self._open_env()
        self._data = self.env.open_db(_DATA_DB)
        self._meta = self.env.open_db(_META_DB)
        # only the handle: the table was built when the store was opened, and a
        # build here would pass the gate this caller holds exclusively (a deadlock)
        try:
            self._conflicts = self.env.open_db(_CONFLICTS_DB, create=False)
        except lmdb.NotFoundError:
            self._conflicts = None

    def _os_error(self, exc: lmdb.Error, doing: str, path: Path | None = None) -> OSError:
        """LMDB's error as the OSError it stands for (EIO when it is LMDB's own),
        naming the file (the snapshot's by default), for the store to report
        (ENOSPC: disk full)."""
        code = getattr(exc, "code", 0)
        if not isinstance(code, int) or code <= 0:
            code = errno.EIO
        return OSError(code, f"LMDB {doing} failed: {exc}", str(path or self.path / "data.mdb"))

    def write_raw(self, fn: Callable[[EntryWriter], None]) -> None:
        """Run ``fn`` with a writer of entries (sealed as they go) in one write
        transaction on the data table (repair, tools)."""
        with self._gate.shared(), self.env.begin(write=True, db=self._data) as txn:
            fn(EntryWriter(txn, self._conflicts))

    def load(self, entries: Iterable[tuple[bytes, bytes]], meta: dict[bytes, bytes]) -> int:
        """Fill an empty snapshot with ``entries`` (key order) and metadata entries
        (the applied LSN among them), sealed, in transactions of bounded size;
        return how many entries. For repair: nothing reads it before it is done."""
        count = 0
        chunk: list[tuple[bytes, bytes]] = []
        size = 0

        def put(batch: list[tuple[bytes, bytes]]) -> None:
            def transaction() -> None:
                with self.env.begin(write=True, db=self._data) as txn:
                    txn.cursor().putmulti([(k, seal(k, e)) for k, e in batch])
                    self._index_conflicts(txn, batch)
            self._write("load", transaction)

        for key, entry in entries:
            chunk.append((key, entry))
            size += len(key) + len(entry)
            count += 1
            if len(chunk) >= 65536 or size >= _LOAD_BYTES:
                put(chunk)
                chunk, size = [], 0
        if chunk:
            put(chunk)

        def put_meta() -> None:
            with self.env.begin(write=True) as txn:
                for name, value in meta.items():
                    txn.put(name, seal(name, value), db=self._meta)
        self._write("load", put_meta)
        return count

    def _grow(self) -> None:
        with self._gate.exclusive():
            size = int(self.env.info()["map_size"])
            new_size = size * 2
            try:
                self.env.set_mapsize(new_size)
            except lmdb.Error as exc:
                # a failed remap leaves the handle without a map: reads would
                # crash; a fresh handle maps the file at its current size
                self._reopen_env()
                raise CapacityError(
                    f"cannot grow the LMDB map of {self.path} to {new_size} bytes: {exc}",
                    hint="free disk space or address space",
                ) from None

    def sync(self) -> None:
        """Make every applied transaction durable (a checkpoint's first half).

        A sync interrupted by a signal reported nothing about the data and is
        asked again; any other failure is raised as an OSError naming the file.
        Under the gate: a compaction closes and reopens the environment.
        """
        with self._gate.shared():
            while True:
                try:
                    self.env.sync(True)
                    return
                except lmdb.Error as exc:
                    if getattr(exc, "code", 0) == errno.EINTR:
                        continue
                    raise self._os_error(exc, "sync") from exc

    def copy_to(self, directory: Path) -> int:
        """Write a compact copy of the snapshot as one read transaction sees it
        into the empty ``directory`` and fsync it; return the LSN it holds.

        Commits go on meanwhile (the copy is a reader). It is the checkpoint's
        base: LMDB runs without fsync, so after a power loss only a file that
        nothing has written since it was synced can be trusted.
        """
        with self._gate.shared():
            txn = self._begin_read()
            try:
                raw = self.get_meta(_APPLIED_LSN, txn)
                # LMDB's own thread writes the copy; its failure comes back here
                self.env.copy(str(directory), compact=True, txn=txn)
            except lmdb.Error as exc:
                raise self._os_error(exc, "copy", directory / "data.mdb") from exc
            finally:
                txn.abort()
        _sync_copied_file(directory / "data.mdb")
        return int.from_bytes(raw, "little") if raw else 0

    def live_bytes(self) -> int:
        """About what a compact copy takes: the pages in use (not the file's free ones)."""
        with self.read() as txn:
            pages = sum(st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
                        for st in (txn.stat(self._data), txn.stat(self._meta)))
        return int(pages * self.env.stat()["psize"])

    def file_bytes(self) -> int:
        try:
            return os.path.getsize(self.path / "data.mdb")
        except OSError:
            return 0

    def compact(self, purge_tombstones: bool = False) -> tuple[int, int]:
        """Rewrite the snapshot without free pages: (bytes before, bytes after).

        LMDB never shrinks its file; this copies the live pages into a new one
        (fsynced), then swaps directories. A crash at any point leaves either
        the old snapshot or the complete new one (``_finish_compaction``).
        ``purge_tombstones`` also drops deleted keys' tombstones (only safe for
        a store that has never synced: the caller decides).
        """
        with self._gate.exclusive():
            before = self.file_bytes()
            if purge_tombstones:
                self._purge_tombstones()
            self.env.sync(True)
            fresh, old = _compaction_paths(self.path)
            if fresh.exists():
                _fs.remove_tree(fresh)
            _fs.make_dir(fresh)
            self.env.copy(str(fresh), compact=True)
            _sync_copied_file(fresh / "data.mdb")
            self.env.close()
            _fs.rename(self.path, old)
            _fs.rename(fresh, self.path)
            _fs.fsync_dir(self.path.parent)
            _fs.remove_tree(old)
            self.env = self._open_env()
            self._data = self.env.open_db(_DATA_DB)
            self._meta = self.env.open_db(_META_DB)
            self._conflicts = self._open_conflicts()
            return before, self.file_bytes()

    def _purge_tombstones(self) -> None:
        with self.env.begin(write=True, db=self._data) as txn:
            doomed = [bytes(k) for k, v in txn.cursor()
                      if all(s.data is None for s in decode_entry(self._opened(k, v, "data")))]
            for key in doomed:
                txn.delete(key)
                if self._conflicts is not None:
                    txn.delete(key, db=self._conflicts)

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.shutdown()
            self._ahead = None
        self.env.close()


def check_length(env: lmdb.Environment, data_file: Path) -> None:
    """Refuse a file shorter than the pages its meta page counts (cut short, or a
    damaged page count): LMDB maps the file and would fault reading past its end.
    A writer extends the file before its meta page counts the new pages, so the
    count is read first."""
    last = int(env.info()["last_pgno"])
    size = os.path.getsize(data_file)
    need = (last + 1) * int(env.stat()["psize"])
    if size < need:
        raise CorruptionError(
            f"the file holds {size} bytes but LMDB's meta page counts {last + 1} pages "
            f"({need} bytes): it was cut short, or its meta page is damaged",
            path=str(data_file), hint=REPAIR_HINT)


#: at most this many problems of one file are kept as errors (the rest are counted)
MAX_LISTED_PROBLEMS = 200


@dataclass
class FileCheck:
    """What reading every value of one LMDB file (a snapshot, or its base) found."""

    path: str
    #: the file's snapshot format (1: values unsealed, checked by decoding only)
    format: int = SNAPSHOT_FORMAT_VERSION
    #: None if its metadata entry is damaged
    applied_lsn: int | None = 0
    #: values read from the data table, and LMDB's own count of them
    entries: int = 0
    recorded_entries: int = 0
    #: keys whose values failed their checksum (or, in format 1, to decode)
    damaged: list[bytes] = field(default_factory=list)
    #: each problem names the key (where there is one) and the file
    problems: list[CorruptionError] = field(default_factory=list)
    problems_not_listed: int = 0
    #: the tree was walked to its end: every key once, in order, as many as LMDB counts
    complete: bool = True
    #: metadata entries that check out, and the names of those that do not
    meta: dict[bytes, bytes] = field(default_factory=dict)
    damaged_meta: set[bytes] = field(default_factory=set)

    @property
    def intact(self) -> bool:
        return not self.problems and not self.problems_not_listed

    def add(self, message: str) -> None:
        if len(self.problems) < MAX_LISTED_PROBLEMS:
            self.problems.append(CorruptionError(message, path=self.path, hint=REPAIR_HINT))
        else:
            self.problems_not_listed += 1


_P_BRANCH, _P_LEAF, _P_OVERFLOW = 0x01, 0x02, 0x04
_F_BIGDATA, _F_SUBDATA = 0x01, 0x02
_PAGE_HEAD = struct.Struct("<QHHHH")  # pgno, pad, flags, lower, upper
_NODE_HEAD = struct.Struct("<HHHH")  # lo, hi, flags, key size
#: MDB_db: pad, flags, depth, branch, leaf, overflow pages, entries, root page
_DB_RECORD = struct.Struct("<IHHQQQQQ")
_META_RECORD = struct.Struct("<II")  # magic, version (at offset 16 of a meta page)
_META_MAGIC = 0xBEEFC0DE
_NO_PAGE = (1 << 64) - 1


class _TreeWalk:
    """LMDB's B-trees in one file, walked page by page in Python from the meta page
    of a read transaction, before LMDB itself walks them.

    LMDB trusts its pages: a damaged page type or link makes its cursor fail an
    assertion and abort the process (``IS_LEAF(mp)`` in ``mdb_cursor_next``),
    and a damaged length makes it read past a page. So verify and repair check
    every page of every tree first, as LMDB's format has it (a page's header
    names its own number and type; branch nodes link pages of the next level;
    leaf nodes hold their value in the page or on a run of overflow pages), and
    let LMDB walk only trees that check out. The file is read through a map of
    its own: a bad page number is a problem reported, never a fault.
    """

    def __init__(self, data_file: str, txnid: int, psize: int) -> None:
        self.problems: list[str] = []
        #: named tables whose tree checks out (b"": the table of tables)
        self.good: set[bytes] = set()
        #: no meta page holds the transaction (a writer may have moved on)
        self.no_meta = False
        with open(data_file, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._walk_all(txnid, psize)
        finally:
            self._map.close()

    def _walk_all(self, txnid: int, psize: int) -> None:
        m = self._map
        self._psize = psize
        self._pages = len(m) // psize
        meta_at = None
        for at in (0, psize):  # the two meta pages; LMDB reads the one of its transaction
            if at + 152 <= len(m) and _META_RECORD.unpack_from(m, at + 16)[0] == _META_MAGIC \
                    and struct.unpack_from("<Q", m, at + 144)[0] == txnid:
                meta_at = at
        if meta_at is None:
            self.no_meta = True
            self.problems.append(f"no meta page holds transaction {txnid}, the one LMDB "
                                 "reads: a meta page is damaged")
            return
        self._last_pg = struct.unpack_from("<Q", m, meta_at + 136)[0]
        self._tree("LMDB's free-page list", _DB_RECORD.unpack_from(m, meta_at + 40))
        named = self._tree("LMDB's table of tables", _DB_RECORD.unpack_from(m, meta_at + 88),
                           collect=True)
        if named is None:
            return
        self.good.add(b"")
        for name, record in named.items():
            if self._tree(f"table {name.decode(errors='replace')!r}", record) is not None:
                self.good.add(name)

    def _tree(self, what: str, record: tuple[int, ...],
              collect: bool = False) -> dict[bytes, tuple[int, ...]] | None:
        """Check one tree; None if it is damaged, else the named tables it lists
        (``collect``: the main table's entries are table records)."""
        m, psize = self._map, self._psize
        _pad, _flags, depth, _branch, _leaf, _overflow, entries, root = record
        named: dict[bytes, tuple[int, ...]] = {}
        if root == _NO_PAGE:
            if entries:
                self.problems.append(f"{what}: no pages but {entries} entries")
                return None
            return named
        stack = [(root, 1)]
        seen: set[int] = set()
        counted = 0
        while stack:
            pgno, level = stack.pop()
            if pgno in seen or pgno > self._last_pg or pgno >= self._pages or pgno < 2:
                self.problems.append(f"{what}: a link to page {pgno}, which is not one of "
                                     "its pages: a page is damaged")
                return None
            seen.add(pgno)
            at = pgno * psize
            own, _pad2, flags, lower, upper = _PAGE_HEAD.unpack_from(m, at)
            want = _P_LEAF if level == depth else _P_BRANCH
            if own != pgno or flags & (_P_LEAF | _P_BRANCH | _P_OVERFLOW) != want \
                    or not 16 <= lower <= upper <= psize or (lower - 16) % 2:
                self.problems.append(f"{what}: page {pgno} is not the "
                                     f"{'leaf' if want == _P_LEAF else 'branch'} page its "
                                     "tree links to: a page is damaged")
                return None
            count = (lower - 16) // 2
            children = []
            for i in range(count):
                node = struct.unpack_from("<H", m, at + 16 + 2 * i)[0]
                if not upper <= node <= psize - 8:
                    self.problems.append(f"{what}: page {pgno} has a node outside it")
                    return None
                lo, hi, nflags, ksize = _NODE_HEAD.unpack_from(m, at + node)
                if node + 8 + ksize > psize:
                    self.problems.append(f"{what}: page {pgno} has a key running past it")
                    return None
                if want == _P_BRANCH:
                    children.append(lo | hi << 16 | nflags << 32)
                    continue
                counted += 1
                size = lo | hi << 16
                start = node + 8 + ksize
                if nflags & _F_BIGDATA:
                    if start + 8 > psize or not self._overflow(
                            struct.unpack_from("<Q", m, at + start)[0], size):
                        self.problems.append(f"{what}: page {pgno} links a value to pages "
                                             "that do not hold it: a page is damaged")
                        return None
                elif start + size > psize:
                    self.problems.append(f"{what}: page {pgno} has a value running past it")
                    return None
                if collect and nflags & _F_SUBDATA and size == _DB_RECORD.size:
                    key = bytes(m[at + node + 8:at + node + 8 + ksize])
                    named[key] = _DB_RECORD.unpack_from(m, at + start)
            stack.extend((child, level + 1) for child in reversed(children))
        if counted != entries:
            self.problems.append(f"{what}: its pages hold {counted} entries, its record "
                                 f"says {entries}: a page is damaged")
            return None
        return named

    def _overflow(self, pgno: int, size: int) -> bool:
        """Whether ``pgno`` starts a run of overflow pages that holds ``size`` bytes."""
        if pgno < 2 or pgno >= self._pages or pgno > self._last_pg:
            return False
        own, _pad, flags, _lower, _upper = _PAGE_HEAD.unpack_from(self._map, pgno * self._psize)
        run = struct.unpack_from("<I", self._map, pgno * self._psize + 12)[0]
        return (own == pgno and bool(flags & _P_OVERFLOW) and run * self._psize >= size + 16
                and pgno + run <= min(self._pages, self._last_pg + 1))


class CheckedFile:
    """One LMDB file opened read-only, to check every value in one read transaction.

    A store's snapshot (``lock``: its writer may be at work), or its base copy
    (no lock: nothing writes a base, and checking it must not make a lock file
    in it). A value is checked before a byte of it is copied: a damaged length
    that runs past the file is damage, not a crash.
    """

    def __init__(self, directory: Path, *, lock: bool) -> None:
        self.directory = directory
        data_file = directory / "data.mdb"
        self.check = check = FileCheck(str(data_file))
        self._file_bytes = os.path.getsize(data_file)
        try:
            self._env = lmdb.open(str(directory), map_size=1 << 20, subdir=True, readonly=True,
                                  create=False, lock=lock, max_dbs=4, readahead=False)
        except lmdb.Error as exc:
            if "already open in this process" in str(exc):
                raise StoreStateError(
                    f"the snapshot {directory} is open in this process",
                    hint="check it from another process, or after closing the store",
                ) from None
            raise CorruptionError(f"LMDB cannot open the file: {exc}", path=check.path,
                                  hint=REPAIR_HINT) from None
        try:
            check_length(self._env, data_file)
        except BaseException:
            self._env.close()
            raise
        try:
            self._data = self._env.open_db(_DATA_DB, create=False)
            self._meta = self._env.open_db(_META_DB, create=False)
            self._txn = self._walked_txn()
            check.recorded_entries = int(self._txn.stat(self._data)["entries"])
            if _META_DB in self._tree_good:
                self._read_meta()
            else:
                check.applied_lsn = None
        except lmdb.NotFoundError:
            self._env.close()
            raise SnapshotUninitialisedError(
                f"the snapshot {directory} has no tables yet: its creation was cut short"
            ) from None
        except lmdb.Error as exc:
            self._env.close()
            raise CorruptionError(f"LMDB cannot read the file: {exc}", path=check.path,
                                  hint=REPAIR_HINT) from None

    @property
    def walkable(self) -> bool:
        """Whether the data table's pages check out (else ``entries`` yields nothing)."""
        return _DATA_DB in self._tree_good

    def _walked_txn(self) -> lmdb.Transaction:
        """A read transaction whose trees were walked page by page (``_TreeWalk``);
        what does not check out is left to no LMDB cursor. A writer that commits
        while the walk starts may take the meta page of the transaction: a few tries."""
        psize = int(self._env.stat()["psize"])
        for _ in range(5):
            txn = self._env.begin(buffers=True)
            walk = _TreeWalk(self.check.path, int(txn.id()), psize)
            if not walk.no_meta or int(self._env.info()["last_txnid"]) == int(txn.id()):
                break
            txn.abort()
        for problem in walk.problems:
            self.check.add(problem)
        self._tree_good = walk.good
        return txn

    def _value(self, key: bytes, raw: bytes | memoryview, legacy: bool) -> bytes | None:
        """The entry a value holds, or None if it is damaged."""
        if len(raw) > self._file_bytes:
            return None
        if legacy:
            return bytes(raw)
        return unseal(key, raw)

    def _read_meta(self) -> None:
        check = self.check
        raw_format = self._txn.get(_FORMAT, db=self._meta)
        if raw_format is None:
            if check.recorded_entries or int(self._txn.stat(self._meta)["entries"]):
                check.format = 1
        else:
            value = self._value(_FORMAT, raw_format, False)
            if value is None:
                check.add(f"metadata entry {key_text(_FORMAT)} fails its checksum")
            else:
                check.format = int.from_bytes(value, "little")
        if check.format not in (1, SNAPSHOT_FORMAT_VERSION):
            raise FormatVersionError(
                f"snapshot format version {check.format} is not supported by this walsync, "
                f"which reads version {SNAPSHOT_FORMAT_VERSION}", path=check.path)
        for raw_name, raw in self._txn.cursor(db=self._meta):
            name = bytes(raw_name)
            if name == _FORMAT:
                continue  # checked above
            value = self._value(name, raw, check.format == 1)
            if value is None:
                check.damaged_meta.add(name)
                check.add(f"metadata entry {key_text(name)} fails its checksum")
            else:
                check.meta[name] = value
        applied = check.meta.get(_APPLIED_LSN, b"")
        check.applied_lsn = (None if _APPLIED_LSN in check.damaged_meta
                             else int.from_bytes(applied, "little"))

    def entries(self, *, lookups: bool = True) -> Iterator[tuple[bytes, bytes | None]]:
        """Every key in order with its entry (None: damaged). Problems go to
        ``check``; keys a damaged tree yields out of order are left out.
        ``lookups`` also finds every key again through the branch pages (a copy
        LMDB just wrote built them anew from the keys: it can skip that)."""
        check = self.check
        if _DATA_DB not in self._tree_good:
            check.complete = False  # the walk named the damage; LMDB must not walk it
            return
        legacy = check.format == 1
        prev: bytes | None = None
        steps = 0
        limit = 2 * check.recorded_entries + 1000
        try:
            for raw_key, raw in self._txn.cursor(db=self._data):
                steps += 1
                if steps > limit:
                    check.add(f"walking LMDB's tree does not end after {limit} values: "
                              "its pages are damaged")
                    check.complete = False
                    return
                key = bytes(raw_key)
                if prev is not None and key <= prev:
                    check.add(f"LMDB's tree yields key {key_text(key)} after key "
                              f"{key_text(prev)}, out of order: a page is damaged")
                    check.complete = False
                    continue
                prev = key
                check.entries += 1
                # a lookup finds its way by the branch pages' keys, the walk by their
                # links: both must reach the same value
                found = self._txn.get(key, db=self._data) if lookups else raw
                if found is None or len(found) != len(raw) or found[:8] != raw[:8]:
                    check.add(f"looking up key {key_text(key)} in LMDB's tree and walking it "
                              "disagree: a branch page is damaged")
                    check.complete = False
                entry = self._value(key, raw, legacy)
                if entry is not None and legacy:
                    try:
                        decode_entry(entry)
                    except CorruptionError:
                        entry = None
                if entry is None:
                    check.damaged.append(key)
                    check.add(f"snapshot entry of key {key_text(key)} "
                              + ("does not decode" if legacy else "fails its checksum"))
                yield key, entry
        except lmdb.Error as exc:
            check.add(f"LMDB cannot walk the file past key "
                      f"{key_text(prev) if prev is not None else '(the first)'}: {exc}")
            check.complete = False
            return
        if check.complete and check.entries != check.recorded_entries:
            check.add(f"LMDB counts {check.recorded_entries} entries but walking its tree finds "
                      f"{check.entries}: a page is damaged")
            check.complete = False

    def close(self) -> None:
        with suppress(lmdb.Error):
            self._txn.abort()
        self._env.close()


def _sync_copied_file(path: Path) -> None:
    """LMDB creates a copy with the process umask: make it 0600, fsync it and its directory."""
    os.chmod(path, _fs.FILE_MODE)
    _fs.fsync_file(path)
    _fs.fsync_dir(path.parent)


def _compaction_paths(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + ".compact"), path.with_name(path.name + ".old")


def compaction_survivor(path: Path) -> Path:
    """The snapshot directory the next writer's open will use (``_finish_compaction``):
    ``path``, or what a compaction interrupted between its renames left. For readers
    that must not finish the compaction themselves (``verify``)."""
    fresh, old = _compaction_paths(path)
    if path.exists():
        return path
    return fresh if fresh.exists() else old if old.exists() else path


def finish_compaction(path: Path) -> None:
    """What a writer's open does first (repair holds the writer lock too)."""
    _finish_compaction(path)


def _finish_compaction(path: Path) -> None:
    """Complete or undo a compaction a crash interrupted (see SnapshotStore.compact)."""
    fresh, old = _compaction_paths(path)
    if not path.exists():
        if fresh.exists():  # the copy was complete and synced before the swap began
            _fs.rename(fresh, path)
        elif old.exists():
            _fs.rename(old, path)
        _fs.fsync_dir(path.parent)
    for leftover in (fresh, old):
        if leftover.exists():
            _fs.remove_tree(leftover)
