"""The LMDB snapshot as a store runs it: the current siblings of every key, and the
applied LSN.

(Over 500 lines: its reads and its writes share one rule for damage, which
every read path applies, and one gate.)

The one class that reads and writes a store's snapshot as it runs (verify
and repair check files through pagecheck.py). LMDB runs without its own
fsync: the WAL is the source of truth, every record is applied only after its
WAL bytes were written (and, for durable commits, synced), and the applied LSN
is stored in the same LMDB transaction as the data it covers, so after a crash
replay starts exactly where the snapshot ends. A checkpoint (``sync``) makes
the snapshot durable up to its applied LSN, which lets the WAL below it be
removed.

Thread rules (gate.py): any thread may read; one thread at a time
applies (the commit pipeline's applier thread, or replay); the map grows by itself when it
is full, behind a gate that reads and writes pass.

Every value is sealed (seal.py) and every read opens the seal,
refusing what does not match with a CorruptionError naming the key and the
file; LMDB's own errors on a damaged file become the same. A snapshot written
before seals existed (format 1) is sealed by the first writer that opens it.
Whole-file work (format upgrade, base copy, compaction, load) is in
bulk.py.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import cbor2
import lmdb

from .. import _fs
from ..errors import CapacityError, CorruptionError
from . import bulk
from .conflicts import ConflictsTable, open_table
from .env import (
    DAMAGE_ON_WRITE,
    NOT_DAMAGE,
    SnapshotUninitialisedError,
    check_length,
    open_env,
    os_error,
)
from .gate import Gate
from .seal import (
    APPLIED_LSN_NAME,
    CONFLICTS_DB,
    DATA_DB,
    HLC_NAME,
    META_DB,
    META_OP_PREFIX,
    REPAIR_HINT,
    SEAL_BYTES,
    key_text,
    pack_seal,
    seal,
    unpack_seal,
    xxh3,
)

log = logging.getLogger("walsync.snapshot")

__all__ = ["ApplyPuts", "Entry", "SnapshotStore"]

#: a snapshot entry, whole or in parts (a large value kept apart from its framing)
Entry = bytes | list[bytes]
#: (pairs, last LSN, highest HLC, whether a pair is a meta op): apply_puts' arguments
ApplyPuts = tuple[Sequence[tuple[bytes, Entry]], int, int, bool]


class SnapshotStore:
    def __init__(self, path: Path, *, map_size_bytes: int, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._map_size_bytes = map_size_bytes
        if not readonly:
            bulk.finish_compaction(path)
            _fs.make_dir(path)
        created = not readonly and not (path / "data.mdb").exists()
        self.env = open_env(path, map_size_bytes, readonly)
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
            self.data_db = self.env.open_db(DATA_DB, create=not readonly)
            self.meta_db = self.env.open_db(META_DB, create=not readonly)
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
        self.gate = Gate()
        #: entries of records acknowledged and not applied yet, by key: (LSN, entry).
        #: The commit pipeline (engine/commit.py) adds them once their WAL frames are
        #: durable and drops them once their LMDB transaction is committed, so a
        #: lookup that misses here finds them in LMDB.
        self.pending: dict[bytes, tuple[int, Entry]] = {}
        #: waits until every acknowledged record is applied: the commit pipeline's,
        #: called by a read transaction while ``pending`` holds anything
        self.catch_up: Callable[[], None] = _nothing
        self.data_file = str(path / "data.mdb")
        #: no value can be longer than the file (a damaged length would make a
        #: read run off the map); raised from LMDB's page count when one is
        self._longest = max(self.file_bytes(), 1 << 20)
        #: its handle is opened (and the table built) once the format is checked
        self.conflicts = ConflictsTable(None)
        try:
            bulk.check_format(self)
            self.conflicts = open_table(self, build=not readonly)
        except BaseException:
            self.env.close()
            raise

    # -- reads ---------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A consistent read transaction; keep it short-lived. It holds every
        acknowledged record: those still on their way to LMDB are waited for."""
        if self.pending:
            self.catch_up()
        with self.gate.shared():
            txn = self.begin_read()
            try:
                yield txn
            finally:
                txn.abort()

    @contextmanager
    def read_applied(self) -> Iterator[lmdb.Transaction]:
        """:meth:`read` without waiting for the records on their way: for the commit
        pipeline, which holds them itself (the assigner's overlay)."""
        with self.gate.shared():
            txn = self.begin_read()
            try:
                yield txn
            finally:
                txn.abort()

    def begin_read(self) -> lmdb.Transaction:
        """A read transaction; the caller holds the gate shared and aborts it."""
        # buffers: values are views of the map, checked before a byte is copied
        try:
            try:
                return self.env.begin(db=self.data_db, buffers=True)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
                return self.env.begin(db=self.data_db, buffers=True)
        except lmdb.Error as exc:
            raise self.read_error(exc, None) from exc

    def get_entry(self, key: bytes) -> bytes | None:
        """The entry of ``key`` (its checksum checked), or None. An acknowledged
        record not applied yet is served from ``pending``, looked at first: an
        entry dropped from it meanwhile was committed to LMDB before."""
        waiting = self.pending.get(key)
        if waiting is not None:
            entry = waiting[1]
            return entry if isinstance(entry, bytes) else b"".join(entry)
        with self.gate.shared():
            txn = self.begin_read()
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
            raise self.read_error(exc, key) from exc
        return self.opened(key, raw, "data")

    def _confirm_absent(self, txn: lmdb.Transaction, key: bytes) -> None:
        """A lookup finds its way by the keys in branch pages, which no seal covers:
        one damaged there sends it to the wrong leaf, and a key that is there reads
        as absent. The neighbours a cursor reaches by the pages' links must then
        bracket the key; if they do not, that is damage, not an absent key."""
        cur = txn.cursor(db=self.data_db)
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

    def opened(self, key: bytes, raw: bytes | memoryview, table: str) -> bytes:
        """The entry of a sealed value read from ``table``; damage raises."""
        if len(raw) > self._longest and not self._plausible(len(raw)):
            raise self.damaged(key, table, f"claims {len(raw)} bytes, more than the file holds")
        if len(raw) >= SEAL_BYTES:
            entry = bytes(raw[SEAL_BYTES:])
            if unpack_seal(raw)[0] == xxh3(entry, xxh3(key)):
                return entry
        raise self.damaged(key, table, "fails its checksum")

    def _plausible(self, size: int) -> bool:
        """Whether a value of ``size`` bytes fits in the pages LMDB has (the bound
        is raised as the file grows)."""
        info = self.env.info()
        self._longest = max(self._longest, (int(info["last_pgno"]) + 1) * self.page_bytes())
        return size <= self._longest

    def page_bytes(self) -> int:
        return int(self.env.stat()["psize"])

    def damaged(self, key: bytes, table: str, what: str) -> CorruptionError:
        where = "snapshot entry" if table == "data" else "snapshot metadata entry"
        return CorruptionError(f"{where} of key {key_text(key)} {what}", path=self.data_file,
                               hint=REPAIR_HINT)

    def read_error(self, exc: lmdb.Error, key: bytes | None) -> BaseException:
        """What an LMDB error met while reading stands for: damage to the file
        (naming the key being read), or the error itself when it is not."""
        if isinstance(exc, NOT_DAMAGE):
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
            raw = txn.get(name, db=self.meta_db)
        except lmdb.Error as exc:
            raise self.read_error(exc, name) from exc
        return None if raw is None else self.opened(name, raw, "meta")

    def applied_lsn(self) -> int:
        raw = self.get_meta(APPLIED_LSN_NAME)
        return int.from_bytes(raw, "little") if raw else 0

    def last_hlc(self) -> int:
        raw = self.get_meta(HLC_NAME)
        return int.from_bytes(raw, "little") if raw else 0

    def get_record_meta(self, name: str) -> Any:
        """A value a record's meta op set (None if never set)."""
        raw = self.get_meta(META_OP_PREFIX + name.encode())
        return None if raw is None else cbor2.loads(raw)

    def iter_range(
        self, txn: lmdb.Transaction, start: bytes, stop: bytes | None, reverse: bool
    ) -> Iterator[tuple[bytes, bytes]]:
        """Keys in [start, stop) in key order (or reverse), with their entries
        (each checked; keys out of order, which only a damaged tree yields, raise)."""
        prev: bytes | None = None
        key = b""
        try:
            cur = txn.cursor(db=self.data_db)
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
                    yield key, self.opened(key, value, "data")
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
                yield key, self.opened(key, value, "data")
        except lmdb.Error as exc:
            raise self.read_error(exc, key or None) from exc

    def _out_of_order(self, prev: bytes, key: bytes) -> CorruptionError:
        return CorruptionError(
            f"LMDB's tree yields key {key_text(key)} after key {key_text(prev)}, out of order: "
            "a page of the snapshot is damaged", path=self.data_file, hint=REPAIR_HINT)

    def count(self) -> int:
        with self.read() as txn:
            return int(txn.stat(self.data_db)["entries"])

    # -- writes --------------------------------------------------------------

    def apply_puts(
        self, puts: Sequence[tuple[bytes, Entry]], last_lsn: int, hlc: int, *, meta_ops: bool
    ) -> None:
        """Apply decoded records' ``(key bytes, entry)`` pairs, in LSN order, in one
        transaction that also moves the applied LSN to ``last_lsn``.

        Replay and the commit path: an empty key is a meta op; ``meta_ops`` says
        whether any pair has one (without, the pairs go to LMDB in one
        ``putmulti`` call). An entry may come in parts (a large value kept
        apart): it is sealed and joined here, in one copy.
        """
        self.write("apply", lambda: self._apply_puts_once(puts, last_lsn, hlc, meta_ops))

    def _apply_puts_once(
        self, puts: Sequence[tuple[bytes, Entry]], last_lsn: int, hlc: int, meta_ops: bool
    ) -> None:
        with self.env.begin(write=True, db=self.data_db) as txn:
            self._fill(txn, puts, last_lsn, hlc, meta_ops)

    def _fill(self, txn: lmdb.Transaction, puts: Sequence[tuple[bytes, Entry]], last_lsn: int,
              hlc: int, meta_ops: bool) -> None:
        """Write the pairs, sealed (the empty key: a record's meta op), and the applied LSN."""
        if not meta_ops:
            # sealing inlined for the common whole entry: replay passes here per record
            pack, hash64 = pack_seal, xxh3
            txn.cursor().putmulti([
                (key, pack(hash64(entry, hash64(key))) + entry) if isinstance(entry, bytes)
                else (key, seal(key, entry))
                for key, entry in puts
            ])
        else:
            for key, entry in puts:
                if key:
                    txn.put(key, seal(key, entry))
                else:
                    self._apply_meta_op(txn, entry if isinstance(entry, bytes) else b"".join(entry))
        self.conflicts.index(txn, puts)
        self._set_applied(txn, last_lsn, hlc)

    def _set_applied(self, txn: lmdb.Transaction, last_lsn: int, hlc: int) -> None:
        txn.put(APPLIED_LSN_NAME, seal(APPLIED_LSN_NAME, last_lsn.to_bytes(8, "little")),
                db=self.meta_db)
        old = self.get_meta(HLC_NAME, txn)
        if old is None or int.from_bytes(old, "little") < hlc:
            txn.put(HLC_NAME, seal(HLC_NAME, hlc.to_bytes(8, "little")), db=self.meta_db)

    def _apply_meta_op(self, txn: lmdb.Transaction, entry: bytes) -> None:
        """The empty key carries store metadata (e.g. sync's pull cursor), see FORMAT.md."""
        for name, value in cbor2.loads(entry).items():
            meta_key = META_OP_PREFIX + name.encode()
            txn.put(meta_key, seal(meta_key, cbor2.dumps(value)), db=self.meta_db)

    def put_meta(self, name: bytes, value: bytes) -> None:
        def put() -> None:
            with self.env.begin(write=True) as txn:
                txn.put(name, seal(name, value), db=self.meta_db)

        self.write("meta write", put)

    def write(self, doing: str, transaction: Callable[[], None]) -> None:
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
                with self.gate.shared():
                    transaction()
                return
            except lmdb.MapFullError:
                self._grow()
            except lmdb.Error as exc:
                failure = exc
                break
        with self.gate.exclusive():
            self.reopen_env()
        if isinstance(failure, DAMAGE_ON_WRITE):
            raise CorruptionError(f"LMDB {doing} failed, the snapshot is damaged: {failure}",
                                  path=self.data_file, hint=REPAIR_HINT) from failure
        raise os_error(failure, doing, self.path / "data.mdb") from failure

    def reopen_env(self, *, compacted: bool = False) -> None:
        """A fresh LMDB handle: after a failure left this one unusable, or after a
        compaction swapped the file. The caller holds the gate exclusively."""
        with suppress(lmdb.Error):
            self.env.close()
        self.env = open_env(self.path, self._map_size_bytes, self.readonly)
        self.data_db = self.env.open_db(DATA_DB)
        self.meta_db = self.env.open_db(META_DB)
        # only the handle: the table was built when the store was opened, and a
        # build here would pass the gate this caller holds exclusively (a deadlock)
        try:
            self.conflicts.handle = self.env.open_db(CONFLICTS_DB, create=compacted)
        except lmdb.NotFoundError:
            self.conflicts.handle = None

    def _grow(self) -> None:
        with self.gate.exclusive():
            size = int(self.env.info()["map_size"])
            new_size = size * 2
            try:
                self.env.set_mapsize(new_size)
            except lmdb.Error as exc:
                # a failed remap leaves the handle without a map: reads would
                # crash; a fresh handle maps the file at its current size
                self.reopen_env()
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
        with self.gate.shared():
            while True:
                try:
                    self.env.sync(True)
                    return
                except lmdb.Error as exc:
                    if getattr(exc, "code", 0) == errno.EINTR:
                        continue
                    raise os_error(exc, "sync", self.path / "data.mdb") from exc

    def live_bytes(self) -> int:
        """About what a compact copy takes: the pages in use (not the file's free ones)."""
        with self.read() as txn:
            pages = sum(st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
                        for st in (txn.stat(self.data_db), txn.stat(self.meta_db)))
        return int(pages * self.env.stat()["psize"])

    def file_bytes(self) -> int:
        try:
            return os.path.getsize(self.path / "data.mdb")
        except OSError:
            return 0

    def close(self) -> None:
        self.env.close()


def _nothing() -> None:
    return None
