"""Checking an LMDB file page by page and value by value, for verify and repair.

LMDB trusts its pages: a damaged page type or link makes its cursor fail an
assertion and abort the process, and a damaged length makes it read past a
page. So verify and repair walk every page of every tree in Python first
(``_TreeWalk``), let LMDB walk only trees that check out, and check every
value's seal before a byte of it is copied (``CheckedFile``). What they find
is listed per file (``FileCheck``), each problem naming the key and the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from ..errors import CorruptionError, FormatVersionError, StoreStateError
from ..record import decode_entry
from .env import SnapshotUninitialisedError, check_length
from .seal import (
    APPLIED_LSN_NAME,
    DATA_DB,
    FORMAT_NAME,
    META_DB,
    REPAIR_HINT,
    SNAPSHOT_FORMAT_VERSION,
    key_text,
    unseal,
)

__all__ = ["MAX_LISTED_PROBLEMS", "CheckedFile", "FileCheck"]


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
            self._data = self._env.open_db(DATA_DB, create=False)
            self._meta = self._env.open_db(META_DB, create=False)
            self._txn = self._walked_txn()
            check.recorded_entries = int(self._txn.stat(self._data)["entries"])
            if META_DB in self._tree_good:
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
        return DATA_DB in self._tree_good

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
        raw_format = self._txn.get(FORMAT_NAME, db=self._meta)
        if raw_format is None:
            if check.recorded_entries or int(self._txn.stat(self._meta)["entries"]):
                check.format = 1
        else:
            value = self._value(FORMAT_NAME, raw_format, False)
            if value is None:
                check.add(f"metadata entry {key_text(FORMAT_NAME)} fails its checksum")
            else:
                check.format = int.from_bytes(value, "little")
        if check.format not in (1, SNAPSHOT_FORMAT_VERSION):
            raise FormatVersionError(
                f"snapshot format version {check.format} is not supported by this walsync, "
                f"which reads version {SNAPSHOT_FORMAT_VERSION}", path=check.path)
        for raw_name, raw in self._txn.cursor(db=self._meta):
            name = bytes(raw_name)
            if name == FORMAT_NAME:
                continue  # checked above
            value = self._value(name, raw, check.format == 1)
            if value is None:
                check.damaged_meta.add(name)
                check.add(f"metadata entry {key_text(name)} fails its checksum")
            else:
                check.meta[name] = value
        applied = check.meta.get(APPLIED_LSN_NAME, b"")
        check.applied_lsn = (None if APPLIED_LSN_NAME in check.damaged_meta
                             else int.from_bytes(applied, "little"))

    def entries(self, *, lookups: bool = True) -> Iterator[tuple[bytes, bytes | None]]:
        """Every key in order with its entry (None: damaged). Problems go to
        ``check``; keys a damaged tree yields out of order are left out.
        ``lookups`` also finds every key again through the branch pages (a copy
        LMDB just wrote built them anew from the keys: it can skip that)."""
        check = self.check
        if DATA_DB not in self._tree_good:
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
