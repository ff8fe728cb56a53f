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
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, cast

import cbor2
import lmdb

from . import _fs
from .errors import CapacityError, CorruptionError, StoreStateError
from .record import decode_entry

__all__ = ["AppliedRecord", "SnapshotStore"]

_DATA_DB = b"data"
_META_DB = b"meta"
_APPLIED_LSN = b"applied_lsn"
_HLC = b"hlc"
#: meta-table names set by records' meta ops start with this
META_OP_PREFIX = b"record/"

#: (lsn, kind, hlc, ops) — a decoded WAL record ready to apply
AppliedRecord = tuple[int, int, int, Sequence[Sequence[Any]]]


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
ApplyPuts = tuple[list[tuple[bytes, bytes]], int, int, bool]


class ApplyAhead:
    """An apply filled on a helper thread, committed or aborted on the caller's word."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._decision: bool | None = None
        self._done = False
        #: why filling or committing failed (nothing was applied then)
        self.error: BaseException | None = None
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
            self._data = self.env.open_db(_DATA_DB, create=not readonly)
            self._meta = self.env.open_db(_META_DB, create=not readonly)
        except lmdb.NotFoundError:
            self.env.close()
            raise SnapshotUninitialisedError(
                f"the snapshot {path} has no tables yet: its creation was cut short",
                hint="open the store for writing once; it creates them and replays the WAL",
            ) from None
        self._gate = _Gate()
        self._ahead: ThreadPoolExecutor | None = None

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
        try:
            return self.env.begin(db=self._data, buffers=False)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            return self.env.begin(db=self._data, buffers=False)

    def get_entry(self, key: bytes) -> bytes | None:
        with self._gate.shared():
            txn = self._begin_read()
            try:
                return cast(bytes | None, txn.get(key))
            finally:
                txn.abort()

    def get_meta(self, name: bytes, txn: lmdb.Transaction | None = None) -> bytes | None:
        if txn is not None:
            return cast(bytes | None, txn.get(name, db=self._meta))
        with self.read() as t:
            return cast(bytes | None, t.get(name, db=self._meta))

    def applied_lsn(self) -> int:
        raw = self.get_meta(_APPLIED_LSN)
        return int.from_bytes(raw, "little") if raw else 0

    def last_hlc(self) -> int:
        raw = self.get_meta(_HLC)
        return int.from_bytes(raw, "little") if raw else 0

    def iter_range(
        self, txn: lmdb.Transaction, start: bytes, stop: bytes | None, reverse: bool
    ) -> Iterator[tuple[bytes, bytes]]:
        """Keys in [start, stop) in key order (or reverse), with their entries."""
        cur = txn.cursor(db=self._data)
        if not reverse:
            if not cur.set_range(start):
                return
            for raw_key, value in cur:
                key = cast(bytes, raw_key)
                if stop is not None and key >= stop:
                    return
                yield key, cast(bytes, value)
            return
        if stop is None:
            positioned = cur.last()
        else:
            positioned = cur.set_range(stop)
            positioned = cur.prev() if positioned else cur.last()
        if not positioned:
            return
        for raw_key, value in cur.iterprev():
            key = cast(bytes, raw_key)
            if key < start:
                return
            yield key, cast(bytes, value)

    def count(self) -> int:
        with self.read() as txn:
            return int(txn.stat(self._data)["entries"])

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
                        txn.put(key.encode(), entry)
                    else:
                        self._apply_meta_op(txn, entry)
            self._set_applied(txn, last_lsn, hlc)

    def apply_puts(
        self, puts: Sequence[tuple[bytes, bytes]], last_lsn: int, hlc: int, *, meta_ops: bool
    ) -> None:
        """Apply decoded records' ``(key bytes, entry)`` pairs, in LSN order, in one
        transaction that also moves the applied LSN to ``last_lsn``.

        The bulk form of :meth:`apply` (replay, and the commit path): the same
        rules, with the pairs already flattened and keys encoded. An empty key
        is a meta op; ``meta_ops`` says whether any pair has one (without, the
        pairs go to LMDB in one ``putmulti`` call).
        """
        self._write("apply", lambda: self._apply_puts_once(puts, last_lsn, hlc, meta_ops))

    def _apply_puts_once(
        self, puts: Sequence[tuple[bytes, bytes]], last_lsn: int, hlc: int, meta_ops: bool
    ) -> None:
        with self.env.begin(write=True, db=self._data) as txn:
            self._fill(txn, puts, last_lsn, hlc, meta_ops)

    def _fill(self, txn: lmdb.Transaction, puts: Sequence[tuple[bytes, bytes]], last_lsn: int,
              hlc: int, meta_ops: bool) -> None:
        """Write the pairs (the empty key: a record's meta op) and the applied LSN."""
        if not meta_ops:
            txn.cursor().putmulti(puts)
        else:
            for key, entry in puts:
                if key:
                    txn.put(key, entry)
                else:
                    self._apply_meta_op(txn, entry)
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
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            job.error = exc
        finally:
            job.set_done()

    def _set_applied(self, txn: lmdb.Transaction, last_lsn: int, hlc: int) -> None:
        txn.put(_APPLIED_LSN, last_lsn.to_bytes(8, "little"), db=self._meta)
        old = txn.get(_HLC, db=self._meta)
        if old is None or int.from_bytes(old, "little") < hlc:
            txn.put(_HLC, hlc.to_bytes(8, "little"), db=self._meta)

    def _apply_meta_op(self, txn: lmdb.Transaction, entry: bytes) -> None:
        """The empty key carries store metadata (e.g. sync's pull cursor), see FORMAT.md."""
        for name, value in cbor2.loads(entry).items():
            txn.put(META_OP_PREFIX + name.encode(), cbor2.dumps(value), db=self._meta)

    def get_record_meta(self, name: str) -> Any:
        """A value a record's meta op set (None if never set)."""
        raw = self.get_meta(META_OP_PREFIX + name.encode())
        return None if raw is None else cbor2.loads(raw)

    def put_meta(self, name: bytes, value: bytes) -> None:
        def put() -> None:
            with self.env.begin(write=True) as txn:
                txn.put(name, value, db=self._meta)

        self._write("meta write", put)

    def _write(self, doing: str, transaction: Callable[[], None]) -> None:
        """Run a write ``transaction``, growing the map while it is full.

        When LMDB fails to write (a page, its meta page) it may refuse every
        later transaction of this handle (MDB_PANIC): the handle is reopened,
        so reads go on from the last commit, and an OSError naming the file is
        raised (the store refuses writes from then on; reopening it replays
        the WAL).
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
        raise self._os_error(failure, doing) from failure

    def _reopen_env(self) -> None:
        """A fresh LMDB handle, after a failure left this one unusable. The caller
        holds the gate exclusively."""
        with suppress(lmdb.Error):
            self.env.close()
        self.env = self._open_env()
        self._data = self.env.open_db(_DATA_DB)
        self._meta = self.env.open_db(_META_DB)

    def _os_error(self, exc: lmdb.Error, doing: str) -> OSError:
        """LMDB's error as the OSError it stands for (EIO when it is LMDB's own),
        naming the snapshot file, for the store to report (ENOSPC: disk full)."""
        code = getattr(exc, "code", 0)
        if not isinstance(code, int) or code <= 0:
            code = errno.EIO
        return OSError(code, f"LMDB {doing} failed: {exc}", str(self.path / "data.mdb"))

    def write_raw(self, fn: Callable[[lmdb.Transaction], None]) -> None:
        """Run ``fn`` in a write transaction on the data table (repair, tools)."""
        with self._gate.shared(), self.env.begin(write=True, db=self._data) as txn:
            fn(txn)

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
                raw = txn.get(_APPLIED_LSN, db=self._meta)
                self.env.copy(str(directory), compact=True, txn=txn)
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
            return before, self.file_bytes()

    def _purge_tombstones(self) -> None:
        with self.env.begin(write=True, db=self._data) as txn:
            doomed = [bytes(k) for k, v in txn.cursor()
                      if all(s.data is None for s in decode_entry(bytes(v)))]
            for key in doomed:
                txn.delete(key)

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.shutdown()
            self._ahead = None
        self.env.close()


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
