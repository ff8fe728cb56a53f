"""The store as a sync worker in its own process sees it: a reader beside the writer.

`walsync sync` syncs a store that another process (the orchestrator) may be
writing. It never holds the writer lock for long: it reads the WAL and the
snapshot as any reader does, owns sync's fields (``SYNC``, ``SYNC.lock``) and
hands what it pulls to the writer through the inbox (engine/handoff.py). The
replicator gets a ``Store`` all the same (a ``ReplicationSource``), whose sync
calls take that shape:

* what is safe to ship: the records the writer applied (the snapshot's applied
  LSN), made durable by this process's own ``fdatasync`` of their segments
  when the writer committed them with durability ``none``;
* a pulled page: written to the inbox; merged by the writer, or, when no writer
  is open, by this process taking the writer lock for one open, merge and close
  (a writer opening meanwhile waits, engine/lock.py);
* the wake-up on commit: a thread watching the snapshot's applied LSN;
* a node-id renewal (a copied store): as a writer, when none is open; a live
  writer makes it a SyncError saying to stop the writer first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import _fs
from .errors import StoreLockedError, StoreNotFoundError, SyncError
from .handoff import INBOX_SEQ, SyncLock, inbox_pages, remove_stale_tmp, write_inbox_page
from .identity import NodeIdentity
from .lock import writer_is_alive
from .ops import CommitResult
from .replication import Acknowledger
from .store import Store
from .storefile import read_store_file
from .versions import Sibling

__all__ = ["HANDOFF_EVERY_SECONDS", "WATCH_SECONDS", "SyncWorkerStore", "open_sync_worker"]

log = logging.getLogger("walsync.sync")

#: how often the worker looks at the writer's applied LSN (its wake-up on commit)
WATCH_SECONDS = 0.005
#: with no writer open, pages pulled are merged at most this often while a backlog
#: comes in, and at the end of each round of pulls
HANDOFF_EVERY_SECONDS = 0.5


def open_sync_worker(path: str | os.PathLike[str]) -> SyncWorkerStore:
    """Open ``path`` for the sync worker (a writer may be running on it, or not)."""
    return SyncWorkerStore.open_worker(path)


class SyncWorkerStore(Store):
    """A read-only Store that ships and pulls for a writer in another process."""

    def __init__(self) -> None:
        super().__init__()
        self._sync_lock: SyncLock | None = None
        self._swap = threading.RLock()
        #: the LSN through which this process made the WAL durable itself
        self._durable = 0
        #: the last inbox page this process wrote
        self._last_seq = 0
        #: when the next page may be merged as the writer (a backlog's pages are
        #: merged a batch at a time, not each with an open and a close of the store)
        self._next_handoff = 0.0
        self._listeners: list[Callable[[int], None]] = []
        self._watch: threading.Thread | None = None
        self._watch_stop = threading.Event()
        self._root = Path()

    @classmethod
    def open_worker(cls, path: str | os.PathLike[str]) -> SyncWorkerStore:
        root = Path(path)
        if not (root / "STORE").exists():
            raise StoreNotFoundError(f"no walsync store at {root}")
        lock = SyncLock(root)
        lock.acquire("the sync worker")
        store = cls()
        store.readonly = True
        store._root = root
        store._sync_lock = lock
        try:
            if not writer_is_alive(root / "LOCK"):
                # a store left by a crash: a writer's open replays its WAL (and merges
                # what an earlier worker pulled) before the worker reads the snapshot
                with contextlib.suppress(StoreLockedError):  # a writer came: it did
                    Store.open(root, create=False).close()
            store._open(root, create=False, node_id=None)
            store.sync_ledger.move_to_file()
            remove_stale_tmp(root)
        except BaseException:
            store._sync_lock.release()
            raise
        return store

    # -- the reader handle, and the writer's moments -------------------------------

    def close(self) -> None:
        """Merge what waits in the inbox (as the writer, if none is open), then close."""
        self._watch_stop.set()
        watch = self._watch
        if watch is not None and watch is not threading.current_thread():
            watch.join()
        if not self._health.closed:
            try:
                self.merge_inbox()
            except Exception:  # the next writer's open merges them
                log.exception("sync worker: merging the pages it pulled at close failed")
        with self._swap:
            try:
                super().close()
            finally:
                if self._sync_lock is not None:
                    self._sync_lock.release()

    def _as_writer(self, work: Callable[[Store], Any], *, why: str) -> Any:
        """Close the reader, open the store as its writer (no writer is open), run
        ``work``, close it and open the reader again. Raises SyncError when a writer
        holds the store (``why`` says what it would have done)."""
        with self._swap:
            if writer_is_alive(self._root / "LOCK"):
                raise _writer_open(self.path, why)
            self._health.closed = True
            self._snapshot.close()  # one LMDB handle per process: the writer's, now
            try:
                try:
                    writer = Store.open(self._root, create=False)
                except StoreLockedError:
                    raise _writer_open(self.path, why) from None
                try:
                    return work(writer)
                finally:
                    writer.close()
            finally:
                self._open(self._root, create=False, node_id=None)

    def merge_inbox(self) -> bool:
        """Merge the pages waiting as the writer, if none is open (True: done)."""
        if not inbox_pages(self._root):
            return True
        self._next_handoff = time.monotonic() + HANDOFF_EVERY_SECONDS
        try:
            self._as_writer(lambda _writer: None, why="merge what it pulled")
        except SyncError:
            return False  # the writer merges them
        return True

    # -- what the replicator calls ----------------------------------------------------

    @property
    def applied_lsn(self) -> int:
        with self._swap:
            return self._snapshot.applied_lsn()

    @property
    def shippable_lsn(self) -> int:
        """Applied by the writer and durable: what the writer applied since this was
        last asked is made durable first (``flush``), so the answer is as current as
        a writer's own (sync/incarnation.py compares the server with it)."""
        self.flush()
        return self._durable

    def flush(self) -> None:
        """Make every record the writer applied durable: an ``fdatasync`` of the
        segments holding them, from this process (the kernel's pages are the
        writer's)."""
        if time.monotonic() >= self._next_handoff:
            self.merge_inbox()  # pages pulled since the last hand-off (no writer open)
        with self._swap:
            applied = self._snapshot.applied_lsn()
        if applied <= self._durable:
            return
        segments = self._layout.list_segments()
        for i, (first, path) in enumerate(segments):
            last = segments[i + 1][0] - 1 if i + 1 < len(segments) else None
            if first > applied or (last is not None and last <= self._durable):
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # removed by a checkpoint: it was synced before
            try:
                _fs.fdatasync(fd)
            finally:
                os.close(fd)
        self._durable = applied

    def apply_remote(self, items: Sequence[tuple[str, Sibling]], *,
                     pull_cursor: int | None = None) -> CommitResult | None:
        """A pulled page goes to the inbox, for the writer (or, with none open,
        this process as the writer) to merge through the WAL."""
        with self._swap:
            after = self.sync_ledger.pull_cursor
            pages = inbox_pages(self._root)
            # never a number this process gave before: a page the writer merged and
            # removed may not be in the snapshot yet (it is applied after the WAL)
            seq = max(pages[-1][0] if pages else 0, self._last_seq,
                      int(self._snapshot.get_record_meta(INBOX_SEQ) or 0)) + 1
            self._last_seq = seq
            cursor = after if pull_cursor is None else pull_cursor
            write_inbox_page(self._root, seq, after, cursor, items)
        if time.monotonic() >= self._next_handoff:
            self.merge_inbox()  # else at the round's end (flush), with the pages after it
        return None

    def set_retain_floor(self, lsn: int | None) -> None:
        self.sync_ledger.set_retain_floor(lsn)

    def add_incarnation_token(self, token: str) -> None:
        self.sync_ledger.add_incarnation_token(token)

    def record_directory(self) -> None:
        if read_store_file(self._layout.store_file).get("directory_inode") is not None:
            return  # recorded (a copy is renewed instead: sync/incarnation.py)
        self._as_writer(lambda w: w.record_directory(), why="record its directory")

    def renew_node_id(self, fork_lsn: int, *, reason: str) -> NodeIdentity:
        ident: NodeIdentity = self._as_writer(
            lambda w: w.renew_node_id(fork_lsn, reason=reason),
            why=f"take a fresh node id ({reason})")
        return ident

    def attach_replicator(self, replicator: Acknowledger) -> None:
        """The writer's 'remote' commits wait on ``SYNC`` (engine/handoff.py)."""

    def detach_replicator(self, replicator: Acknowledger, because: str | None = None) -> None:
        """Nothing to detach: see attach_replicator."""

    def add_commit_listener(self, listener: Callable[[int], None]) -> None:
        """``listener(lsn)`` once the writer applied a record past the last one seen
        (checked every ``WATCH_SECONDS``, on a thread of its own)."""
        self._listeners.append(listener)
        if self._watch is None:
            self._watch = threading.Thread(target=self._watch_loop, name="walsync-watch",
                                           daemon=True)
            self._watch.start()

    def remove_commit_listener(self, listener: Callable[[int], None]) -> None:
        self._listeners.remove(listener)

    def _watch_loop(self) -> None:
        seen = 0
        while not self._watch_stop.wait(WATCH_SECONDS):
            try:
                with self._swap:
                    if self._health.closed:
                        continue
                    lsn = self._snapshot.applied_lsn()
            except Exception:  # a reader's hiccup: look again
                log.debug("sync worker: reading the applied LSN failed", exc_info=True)
                continue
            if lsn > seen:
                seen = lsn
                for listener in list(self._listeners):
                    try:
                        listener(lsn)
                    except Exception:
                        log.exception("commit listener %r failed", listener)


def _writer_open(path: str, why: str) -> SyncError:
    return SyncError(
        f"the sync worker of store {path} would {why}, which only the store's writer may "
        "do, and a writer process has the store open",
        hint="stop the writer process (the orchestrator) for a moment and run `walsync sync` "
        "again; it does it and the writer can start again right after")
