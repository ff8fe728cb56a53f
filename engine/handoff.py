"""The hand-off between a store's writer and a sync worker in another process.

A store has one writer process (the orchestrator, holding ``LOCK``), and its
sync worker may run beside it as a second process (`walsync sync`): it reads
the WAL and the snapshot, which the writer only ever appends to and commits
to, and writes nothing the writer writes. What crosses between the two goes
through three files of their own (engine/FORMAT.md, "The sync worker beside a
writer"):

* ``SYNC.lock``, ``flock``ed by the one replicator of the store, in whichever
  process it runs (the worker, or a writer's own background replicator): two
  replicators would ship and claim the node id against each other.
* ``SYNC``, sync's host-local fields once a worker has synced the store (the
  acknowledged LSN, the WAL's retain floor, the server's identity, the claim
  tokens, ...), written by the holder of ``SYNC.lock`` alone and read by the
  writer: its checkpoints keep the WAL the server lacks, its ``remote``
  commits wait for the acknowledgement there (``WorkerAcknowledger``).
* ``inbox/``, pages of versions the worker pulled, each a file the writer
  merges through its own WAL (``InboxApplier``) in one merge record that also
  moves the pull cursor and records the page's sequence number (the record
  meta ``inbox_seq``), so a page is applied once whatever crashes when: a
  page at or below the applied sequence is only removed.

When no writer is open the worker takes the writer lock for the moment of
one apply and lets go (engine/worker.py); a writer opening meanwhile waits
for it (engine/lock.py, ``HANDOFF_WAIT_SECONDS``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cbor2
import xxhash

from . import _fs
from .errors import (
    CorruptionError,
    RemoteDurabilityTimeoutError,
    ReplicatorStoppedError,
    SyncError,
    WalsyncError,
)
from .versions import Sibling

if TYPE_CHECKING:
    from .commit import CommitPipeline
    from .health import Health
    from .snapshot import SnapshotStore

__all__ = [
    "INBOX_DIR",
    "INBOX_FORMAT",
    "INBOX_POLL_SECONDS",
    "INBOX_SEQ",
    "SYNC_FILE",
    "SYNC_FILE_FORMAT",
    "SYNC_LOCK",
    "InboxApplier",
    "InboxPage",
    "SyncFile",
    "SyncLock",
    "WorkerAcknowledger",
    "inbox_pages",
    "kill_point",
    "read_inbox_page",
    "remove_stale_tmp",
    "sync_holder_pid",
    "worker_acknowledger",
    "write_inbox_page",
]

log = logging.getLogger("walsync.store")

SYNC_FILE = "SYNC"
SYNC_LOCK = "SYNC.lock"
INBOX_DIR = "inbox"
#: record-meta name of the last inbox page a merge record applied
INBOX_SEQ = "inbox_seq"
#: record-meta name of the pull cursor (engine/replication.py's PULL_CURSOR)
_PULL_CURSOR = "pull_cursor"

SYNC_FILE_FORMAT = 1
INBOX_FORMAT = 1
_INBOX_MAGIC = b"wsinbox\x00"
_INBOX_SUFFIX = ".page"
#: how often a writer looks for pages (its apply is one merge record per page)
INBOX_POLL_SECONDS = 0.1
#: how often a writer waiting for the worker's acknowledgement reads ``SYNC``
_ACK_POLL_SECONDS = 0.002


def _nothing(_point: str) -> None:
    return None


#: the crash tests' seam: called with the name of each step of a hand-off
kill_point: Callable[[str], None] = _nothing


# -- the one replicator of a store ---------------------------------------------------


def sync_holder_pid(root: Path) -> int | None:
    """The pid of the live process holding ``SYNC.lock`` (None: no replicator runs)."""
    path = root / SYNC_LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        except OSError:
            return None
        return None
    finally:
        os.close(fd)


class _Held:
    """This process's ``flock`` of one store's ``SYNC.lock``, shared by its handles."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.owners: set[int] = set()


#: the locks this process holds, by the store directory's real path: a second
#: descriptor's ``flock`` would conflict with the first one's, in one process too
_held: dict[str, _Held] = {}
_held_mutex = threading.Lock()


class SyncLock:
    """``SYNC.lock``: held by the process whose replicator owns the store's sync state.

    A handle: every handle of one store in one process shares that process's lock,
    taken by the first ``acquire`` and dropped with the last handle's ``release``;
    ``acquire`` again while held is a no-op.
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._key = os.path.realpath(root)
        self._owned = False

    @property
    def held(self) -> bool:
        return self._owned

    def acquire(self, what: str) -> None:
        """Take the lock for ``what`` (said in the error when another process holds it)."""
        with _held_mutex:
            if self._owned:
                return
            held = _held.get(self._key)
            if held is None:
                held = _Held(self._lock_file(what))
                _held[self._key] = held
            held.owners.add(id(self))
            self._owned = True

    def _lock_file(self, what: str) -> int:
        fd = _fs.open_lock(self._root / SYNC_LOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = sync_holder_pid(self._root)
            holder = f"pid {pid}" if pid and pid > 0 else "another process"
            raise SyncError(
                f"store {self._root}: {what} needs the store's sync state, which the "
                f"replicator of {holder} owns (SYNC.lock)",
                hint="one replicator per store: stop the other one (`walsync sync`, or the "
                "writer's Replicator) first",
            ) from None
        try:
            _fs.truncate(fd, 0)
            _fs.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def release(self) -> None:
        with _held_mutex:
            if not self._owned:
                return
            self._owned = False
            held = _held.get(self._key)
            if held is None:
                return
            held.owners.discard(id(self))
            if not held.owners:
                del _held[self._key]
                with contextlib.suppress(OSError):
                    _fs.truncate(held.fd, 0)
                os.close(held.fd)


# -- SYNC: sync's fields, once a worker synced the store -------------------------------


class SyncFile:
    """The ``SYNC`` file: a JSON object, replaced whole (tmp, fsync, rename, fsync dir).

    Written only by the holder of ``SYNC.lock``; read by anyone, re-read when its
    identity (inode, size, mtime) changed.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / SYNC_FILE
        self._mutex = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._doc: dict[str, Any] = {}

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> dict[str, Any]:
        """The fields as last written ({} when there is no file)."""
        with self._mutex:
            return dict(self._load())

    def get(self, name: str) -> Any:
        with self._mutex:
            return self._load().get(name)

    def _load(self) -> dict[str, Any]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._seen, self._doc = None, {}
            return self._doc
        seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        if seen != self._seen:
            try:
                doc = json.loads(self.path.read_bytes())
            except FileNotFoundError:
                return self._load()  # replaced between the stat and the read
            except ValueError as exc:
                raise CorruptionError(f"the sync state file does not decode: {exc}",
                                      path=str(self.path),
                                      hint="stop the sync worker, move the file aside and start "
                                      "it again: it asks the server where shipping goes on"
                                      ) from None
            if not isinstance(doc, dict) or doc.get("format") != SYNC_FILE_FORMAT:
                found = doc.get("format") if isinstance(doc, dict) else None
                raise CorruptionError(
                    f"the sync state file is of format {found!r}; this walsync reads "
                    f"format {SYNC_FILE_FORMAT}", path=str(self.path))
            self._seen, self._doc = seen, doc
        return self._doc

    def update(self, **fields: Any) -> None:
        """Set ``fields`` (the others kept) and replace the file, durably."""
        with self._mutex:
            doc = dict(self._load())
            doc.update(fields)
            doc["format"] = SYNC_FILE_FORMAT
            _fs.atomic_write(self.path, json.dumps(doc, sort_keys=True).encode())
            self._seen = None
            self._load()


# -- the acknowledgement a writer's 'remote' commit waits for ---------------------------


class WorkerAcknowledger:
    """Durability 'remote' in a writer whose replicator is the sync worker: the
    commit returns once ``SYNC`` acknowledges its LSN; it fails at once when no
    worker holds ``SYNC.lock`` any more, or the worker stopped on an error."""

    def __init__(self, root: Path, sync_file: SyncFile) -> None:
        self._root = root
        self._file = sync_file

    def wait_acknowledged(self, lsn: int, timeout_seconds: float) -> None:
        deadline = time.monotonic() + timeout_seconds
        checked_alive = 0.0
        while True:
            doc = self._file.read()
            acked = doc.get("acked_lsn")
            if isinstance(acked, int) and acked >= lsn:
                return
            error = doc.get("last_error")
            if isinstance(error, dict) and error.get("stopped"):
                raise ReplicatorStoppedError(
                    lsn, f"the sync worker of store {self._root} stopped: "
                    f"{error.get('message', '')}")
            now = time.monotonic()
            if now - checked_alive >= 0.05:
                checked_alive = now
                if sync_holder_pid(self._root) is None:
                    raise ReplicatorStoppedError(
                        lsn, f"no sync worker runs for store {self._root} any more (it "
                        "stopped or was killed)")
            if now >= deadline:
                raise RemoteDurabilityTimeoutError(lsn, timeout_seconds)
            time.sleep(min(_ACK_POLL_SECONDS, max(0.0, deadline - now)))


def worker_acknowledger(root: Path, sync_file: SyncFile) -> WorkerAcknowledger | None:
    """The worker's acknowledgement, when a worker (another process) syncs the store."""
    pid = sync_holder_pid(root)
    if pid is None or pid == os.getpid() or not sync_file.exists():
        return None
    return WorkerAcknowledger(root, sync_file)


# -- inbox/: pulled pages on their way to the writer ------------------------------------


@dataclass(frozen=True)
class InboxPage:
    """A page the worker pulled: its versions, and the pull cursor they reach."""

    seq: int
    #: the server position the page was pulled after, and the one it reaches
    after: int
    pull_cursor: int
    items: list[tuple[str, Sibling]]
    path: Path


def _page_name(seq: int) -> str:
    return f"{seq:016x}{_INBOX_SUFFIX}"


def inbox_pages(root: Path) -> list[tuple[int, Path]]:
    """(seq, path) of every page in the inbox, in order ([] without an inbox)."""
    try:
        names = os.listdir(root / INBOX_DIR)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if name.endswith(_INBOX_SUFFIX) and len(name) == 16 + len(_INBOX_SUFFIX):
            try:
                found.append((int(name[:16], 16), root / INBOX_DIR / name))
            except ValueError:
                continue
    found.sort()
    return found


def write_inbox_page(root: Path, seq: int, after: int, pull_cursor: int,
                     items: Sequence[tuple[str, Sibling]]) -> Path:
    """Write a page durably: ``<seq>.page.tmp`` written and fsynced, renamed, the
    directory fsynced. A crash before the rename leaves only the tmp file (removed
    by the next worker); the page then is pulled again."""
    directory = root / INBOX_DIR
    _fs.make_dir(directory)
    body = cbor2.dumps([seq, after, pull_cursor, [[k, s.to_wire()] for k, s in items]])
    head = _INBOX_MAGIC + INBOX_FORMAT.to_bytes(2, "little") + \
        xxhash.xxh3_64_intdigest(body).to_bytes(8, "little")
    path = directory / _page_name(seq)
    tmp = path.with_name(path.name + ".tmp")
    kill_point("inbox.write")
    fd = _fs.open_segment(tmp, create=True)
    try:
        _fs.writev(fd, [head, body])
        _fs.fsync(fd)
    finally:
        os.close(fd)
    kill_point("inbox.rename")
    _fs.rename(tmp, path)
    kill_point("inbox.fsync_dir")
    _fs.fsync_dir(directory)
    kill_point("inbox.written")
    return path


def remove_stale_tmp(root: Path) -> None:
    """Pages a worker was writing when it died (never renamed: never applied)."""
    try:
        names = os.listdir(root / INBOX_DIR)
    except FileNotFoundError:
        return
    for name in names:
        if name.endswith(_INBOX_SUFFIX + ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                _fs.unlink(root / INBOX_DIR / name)


def read_inbox_page(path: Path) -> InboxPage:
    """A page, its checksum checked; damage is a CorruptionError naming the file."""
    raw = path.read_bytes()
    head = len(_INBOX_MAGIC) + 10
    if len(raw) < head or raw[:len(_INBOX_MAGIC)] != _INBOX_MAGIC:
        raise _damaged(path, "it does not start with the inbox page header")
    version = int.from_bytes(raw[8:10], "little")
    if version != INBOX_FORMAT:
        raise CorruptionError(f"inbox page {path} is of format {version}; this walsync "
                              f"reads format {INBOX_FORMAT}", path=str(path))
    body = raw[head:]
    if xxhash.xxh3_64_intdigest(body).to_bytes(8, "little") != raw[10:head]:
        raise _damaged(path, "its checksum does not match")
    try:
        seq, after, cursor, wire = cbor2.loads(body)
        items = [(str(k), Sibling.from_wire(list(w))) for k, w in wire]
    except (ValueError, TypeError, cbor2.CBORDecodeError) as exc:
        raise _damaged(path, f"it does not decode ({exc})") from None
    return InboxPage(int(seq), int(after), int(cursor), items, path)


def _damaged(path: Path, why: str) -> CorruptionError:
    return CorruptionError(
        f"inbox page {path} is damaged: {why}", path=str(path),
        hint="stop the sync worker and the writer, move the inbox directory aside, and "
        "start them again: the worker pulls those versions again from the store's "
        "durable pull cursor")


class InboxApplier:
    """The writer's side of the inbox: each page merged through the writer's own
    WAL, in sequence order, then removed; on open and every ``INBOX_POLL_SECONDS``."""

    def __init__(self, root: Path, pipeline: CommitPipeline, snapshot: SnapshotStore,
                 health: Health) -> None:
        self._root = root
        self._pipeline = pipeline
        self._snapshot = snapshot
        self._health = health
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: the damage that stopped applying (reported once)
        self._damage: CorruptionError | None = None

    def applied_seq(self) -> int:
        return int(self._snapshot.get_record_meta(INBOX_SEQ) or 0)

    def drain(self) -> int:
        """Apply every page waiting; returns how many were applied."""
        done = 0
        with self._mutex:
            pages = inbox_pages(self._root)
            if not pages or self._damage is not None:
                return 0
            applied = self.applied_seq()
            for seq, path in pages:
                if self._stop.is_set() and self._thread is not None:
                    break
                if seq > applied:
                    try:
                        page = read_inbox_page(path)
                    except FileNotFoundError:
                        continue
                    except CorruptionError as exc:
                        self._damage = exc
                        log.error("store %s: %s (%s)", self._root, exc, exc.hint)
                        break
                    kill_point("inbox.merge")
                    self._pipeline.merge(page.items, {_PULL_CURSOR: page.pull_cursor,
                                                      INBOX_SEQ: page.seq})
                    applied = seq
                    done += 1
                kill_point("inbox.unlink")
                with contextlib.suppress(FileNotFoundError):
                    _fs.unlink(path)
                kill_point("inbox.removed")
        return done

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="walsync-inbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(INBOX_POLL_SECONDS):
            if self._health.closed or self._health.poisoned is not None:
                return
            try:
                self.drain()
            except WalsyncError as exc:
                log.error("store %s: applying pulled pages failed: %s", self._root, exc)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.error("store %s: reading the inbox failed: %s", self._root, exc)
