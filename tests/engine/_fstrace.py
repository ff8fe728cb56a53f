"""A file-operation trace of a store's workload, and the crash states it allows.

In the manner of the ALICE and CrashMonkey studies: :class:`FsRecorder` wraps
the engine's file-layer seam (``engine._fs``) and logs, in order, every write
(file, offset, bytes), truncate, file sync, directory sync, create, rename and
unlink, plus the points where a commit returns (:class:`Ack`) and where an LMDB
image became durable (:class:`Checkpoint`). Files are followed by identity
(inode), not by name, so a rename carries its data along.

:func:`crash_states` then asks: had the power gone at event ``k``, what could
the disk hold? On a weak filesystem a file holds what it held at its last sync
plus any part of the writes since (dropped, torn, zeroed, garbage, or some
blocks and not others), and a create, rename or unlink counts only once its
directory was synced; until then it may or may not be there. Each state is
built from the trace's bytes alone (never from the live files) and
:func:`materialize` writes it into a fresh directory for the engine to open.

LMDB writes its file from C code, outside the seam: its bytes are taken
(:class:`Capture`) where the engine syncs it (a checkpoint, a copy), and a
crash state holds the image as last synced, or, where LMDB may have written
since (:class:`LiveSnapshot`, a commit), zeros or garbage in its place.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from walsync import engine
from walsync.engine import _fs
from walsync.engine import base as base_module
from walsync.engine.commit import CommitPipeline
from walsync.engine.snapshot import SnapshotStore
from walsync.engine.snapshot import snapshot_store as snapshot_module

# -- events -------------------------------------------------------------------


@dataclass(frozen=True)
class Create:
    """A new file's directory entry."""

    fid: int
    path: str


@dataclass(frozen=True)
class MakeDir:
    path: str


@dataclass(frozen=True)
class Write:
    fid: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class Truncate:
    fid: int
    length: int


@dataclass(frozen=True)
class Sync:
    """fdatasync or fsync of a file: its bytes and size are durable."""

    fid: int
    call: str


@dataclass(frozen=True)
class Capture:
    """A file written outside the seam (by LMDB), synced: its whole content."""

    fid: int
    data: bytes


@dataclass(frozen=True)
class DirSync:
    path: str


@dataclass(frozen=True)
class Rename:
    src: str
    dst: str


@dataclass(frozen=True)
class Unlink:
    """A file, or (``tree``) a directory and everything under it."""

    path: str
    tree: bool = False


@dataclass(frozen=True)
class Intent:
    """The ``seq``-th commit call starts (0-based, in call order)."""

    seq: int


@dataclass(frozen=True)
class Ack:
    """``commit`` returned: LSN ``lsn``, fsynced first if ``durable``."""

    seq: int
    lsn: int
    durable: bool


@dataclass(frozen=True)
class Checkpoint:
    """File ``fid``, an LMDB image holding every LSN up to ``lsn``, was synced."""

    fid: int
    lsn: int


@dataclass(frozen=True)
class LiveSnapshot:
    """LMDB opened file ``fid`` for writing (``created``: it made the file, and
    wrote to it); it writes there without syncing until a :class:`Capture`."""

    fid: int
    created: bool


Event = (
    Create | MakeDir | Write | Truncate | Sync | Capture | DirSync | Rename | Unlink | Intent
    | Ack | Checkpoint | LiveSnapshot
)
NAMESPACE_EVENTS = (Create, MakeDir, Rename, Unlink)


def parent(path: str) -> str:
    """The directory holding ``path`` ("" for the store root)."""
    return path.rpartition("/")[0]


def under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


# -- the recorder -------------------------------------------------------------

#: seam names that do no file operation of their own the trace must see: they
#: call other seam functions (or ``shutil.rmtree``, also wrapped) for it
UNTRACED_SEAM_NAMES = frozenset({
    "DIR_MODE", "FILE_MODE", "atomic_write", "boot_id", "copy_file", "fsync_file",
    "remove_tree",
})
TRACED_SEAM_NAMES = frozenset({
    "fdatasync", "fsync", "fsync_dir", "make_dir", "open_append", "open_lock",
    "open_segment", "pwrite", "rename", "truncate", "unlink", "writev", "zero_fill",
})


class FsRecorder:
    """Wraps ``engine._fs`` (and the commit and LMDB-sync points) while in a
    ``with`` block, appending events to :attr:`events` in the order they happen.

    Thread-safe: the segment preparer writes from a thread of its own. Paths
    are kept relative to ``root`` ("" is the root); operations outside it are
    left out.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.events: list[Event] = []
        self._lock = threading.RLock()
        self._fids: dict[tuple[int, int], int] = {}
        self._path_of: dict[int, str] = {}
        #: files whose bytes are written outside the seam (taken whole when synced)
        self._external: set[int] = set()
        self._next_fid = 1
        self._seq = 0
        self._undo: list[tuple[Any, str, Any]] = []

    # -- bookkeeping

    def rel(self, path: str | os.PathLike[str]) -> str | None:
        full = Path(os.path.abspath(path))
        try:
            rel = full.relative_to(self.root)
        except ValueError:
            return None
        text = rel.as_posix()
        return "" if text == "." else text

    def _emit(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def _new_file(self, key: tuple[int, int], rel: str) -> int:
        fid = self._next_fid
        self._next_fid += 1
        self._fids[key] = fid
        self._path_of[fid] = rel
        self._emit(Create(fid, rel))
        return fid

    def _fid_of_fd(self, fd: int, *, external: bool = False) -> int | None:
        """The file behind ``fd``; a file first seen here (created outside the
        seam) is given a create event now."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        where = os.readlink(f"/proc/self/fd/{fd}")
        rel = self.rel(where.removesuffix(" (deleted)"))
        deleted = where.endswith(" (deleted)")
        with self._lock:
            fid = self._fids.get(key)
            if fid is not None and (deleted or self._path_of[fid] == rel):
                return fid
            if rel is None or deleted:
                return None
            fid = self._new_file(key, rel)
            if external:
                self._external.add(fid)
            return fid

    def _fid_of_path(self, path: Path) -> int | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        fid = self._fids.get((st.st_dev, st.st_ino))
        return fid if fid is not None and self._path_of.get(fid) == self.rel(path) else None

    def _moved(self, src: str, dst: str) -> None:
        for fid, path in list(self._path_of.items()):
            if under(path, src):
                self._path_of[fid] = dst + path[len(src):]

    def _forget(self, top: str) -> None:
        for fid, path in list(self._path_of.items()):
            if under(path, top):
                self._path_of[fid] = "\0gone"

    # -- wrappers

    def _open_segment(self, path: Path, *, create: bool) -> int:
        existed = path.exists()
        fd = int(self._real["open_segment"](path, create=create))
        self._after_open(fd, path, existed, truncated=create)
        return fd

    def _open_append(self, path: Path) -> int:
        existed = path.exists()
        fd = int(self._real["open_append"](path))
        self._after_open(fd, path, existed, truncated=False)
        return fd

    def _open_lock(self, path: Path) -> int:
        existed = path.exists()
        fd = int(self._real["open_lock"](path))
        self._after_open(fd, path, existed, truncated=False)
        return fd

    def _after_open(self, fd: int, path: Path, existed: bool, *, truncated: bool) -> None:
        rel = self.rel(path)
        if rel is None:
            return
        st = os.fstat(fd)
        with self._lock:
            if not existed:
                self._new_file((st.st_dev, st.st_ino), rel)
                return
            fid = self._fid_of_fd(fd)
            if truncated and fid is not None:
                self._emit(Truncate(fid, 0))

    def _writev(self, fd: int, buffers: Sequence[bytes]) -> int:
        n = int(self._real["writev"](fd, buffers))
        fid = self._fid_of_fd(fd)
        if fid is not None:
            end = os.lseek(fd, 0, os.SEEK_CUR)
            data = b"".join(bytes(b) for b in buffers)
            self._emit(Write(fid, end - len(data), data))
        return n

    def _pwrite(self, fd: int, data: bytes, offset: int) -> None:
        self._real["pwrite"](fd, data, offset)
        fid = self._fid_of_fd(fd)
        if fid is not None:
            self._emit(Write(fid, offset, bytes(data)))

    def _zero_fill(self, fd: int, size: int, stop: Callable[[], bool]) -> bool:
        fid = self._fid_of_fd(fd)
        if fid is not None:
            self._emit(Write(fid, os.lseek(fd, 0, os.SEEK_CUR), bytes(size)))
        return bool(self._real["zero_fill"](fd, size, stop))

    def _synced(self, fd: int, call: str) -> None:
        fid = self._fid_of_fd(fd, external=True)
        if fid is None:
            return
        if fid in self._external:
            with open(f"/proc/self/fd/{fd}", "rb") as f:
                self._emit(Capture(fid, f.read()))
        else:
            self._emit(Sync(fid, call))

    def _fdatasync(self, fd: int) -> None:
        self._real["fdatasync"](fd)
        self._synced(fd, "fdatasync")

    def _fsync(self, fd: int) -> None:
        self._real["fsync"](fd)
        self._synced(fd, "fsync")

    def _fsync_dir(self, path: Path) -> None:
        self._real["fsync_dir"](path)
        rel = self.rel(path)
        if rel is not None:
            self._emit(DirSync(rel))

    def _truncate(self, fd: int, length: int) -> None:
        self._real["truncate"](fd, length)
        fid = self._fid_of_fd(fd)
        if fid is not None:
            self._emit(Truncate(fid, length))

    def _rename(self, src: Path, dst: Path) -> None:
        with self._lock:
            self._real["rename"](src, dst)
            rs, rd = self.rel(src), self.rel(dst)
            if rs is not None and rd is not None:
                self._forget(rd)
                self._moved(rs, rd)
                self._emit(Rename(rs, rd))

    def _unlink(self, path: Path) -> None:
        with self._lock:
            self._real["unlink"](path)
            rel = self.rel(path)
            if rel is not None:
                self._forget(rel)
                self._emit(Unlink(rel))

    def _make_dir(self, path: Path, **kwargs: Any) -> bool:
        missing = [p for p in (path, *path.parents) if not p.exists()]
        for p in reversed(missing):
            rel = self.rel(p)
            if rel is not None:
                self._emit(MakeDir(rel))
        return bool(self._real["make_dir"](path, **kwargs))

    def _rmtree(self, path: Any, *args: Any, **kwargs: Any) -> None:
        with self._lock:
            self._real_rmtree(path, *args, **kwargs)
            rel = self.rel(path)
            if rel is not None:
                self._forget(rel)
                self._emit(Unlink(rel, tree=True))

    # -- install

    def __enter__(self) -> FsRecorder:
        unknown = set(_fs.__all__) - TRACED_SEAM_NAMES - UNTRACED_SEAM_NAMES
        if unknown:
            raise AssertionError(f"engine._fs grew {sorted(unknown)}: trace them")
        self._real: dict[str, Any] = {name: getattr(_fs, name) for name in TRACED_SEAM_NAMES}
        for name in TRACED_SEAM_NAMES:
            self._patch(_fs, name, getattr(self, "_" + name))
        self._real_rmtree = shutil.rmtree
        self._patch(shutil, "rmtree", self._rmtree)
        self._patch_commit()
        self._patch_snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        while self._undo:
            owner, name, value = self._undo.pop()
            setattr(owner, name, value)

    def _patch(self, owner: Any, name: str, value: Any) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def _patch_commit(self) -> None:
        # every local commit (put, delete, batch, commit) passes the pipeline once
        real_commit = CommitPipeline.commit
        recorder = self

        def commit(pipeline: CommitPipeline, ops: Any, *args: Any,
                   **kwargs: Any) -> engine.CommitResult:
            with recorder._lock:
                seq = recorder._seq
                recorder._seq += 1
            recorder._emit(Intent(seq))
            result = real_commit(pipeline, ops, *args, **kwargs)
            recorder._emit(Ack(seq, result.lsn, result.durability is not engine.Durability.NONE))
            return result

        self._patch(CommitPipeline, "commit", commit)

    def _patch_snapshot(self) -> None:
        recorder = self
        real_open = snapshot_module.open_env

        def open_env(path: Path, map_size_bytes: int, readonly: bool) -> Any:
            env = real_open(path, map_size_bytes, readonly)
            if not readonly:
                recorder._opened_lmdb(path / "data.mdb")
            return env

        self._patch(snapshot_module, "open_env", open_env)
        real_sync = SnapshotStore.sync

        def sync(snapshot: SnapshotStore) -> None:
            lsn = snapshot.applied_lsn()  # what the sync covers at least
            real_sync(snapshot)
            recorder._captured(snapshot.path / "data.mdb", lsn)

        self._patch(SnapshotStore, "sync", sync)
        real_copy = base_module.copy_to

        def copy_to(snapshot: SnapshotStore, directory: Path) -> int:
            lsn = int(real_copy(snapshot, directory))
            fid = recorder._fid_of_path(directory / "data.mdb")
            if fid is not None:
                recorder._emit(Checkpoint(fid, lsn))
            return lsn

        self._patch(base_module, "copy_to", copy_to)

    def _lmdb_file(self, data_file: Path) -> int | None:
        """The LMDB file's identity; LMDB creates it outside the seam, so a file
        first seen here gets its create event now (right after LMDB's open)."""
        rel = self.rel(data_file)
        if rel is None:
            return None
        with self._lock:
            st = os.stat(data_file)
            key = (st.st_dev, st.st_ino)
            fid = self._fids.get(key)
            if fid is None or self._path_of.get(fid) != rel:
                fid = self._new_file(key, rel)
            self._external.add(fid)
            return fid

    def _opened_lmdb(self, data_file: Path) -> None:
        with self._lock:
            known = set(self._path_of)
            fid = self._lmdb_file(data_file)
            if fid is not None:
                self._emit(LiveSnapshot(fid, fid not in known))

    def _captured(self, data_file: Path, lsn: int) -> None:
        """LMDB synced its file: take its bytes as the durable image."""
        with self._lock:
            fid = self._lmdb_file(data_file)
            if fid is not None:
                self._emit(Capture(fid, data_file.read_bytes()))
                self._emit(Checkpoint(fid, lsn))


# -- crash states ---------------------------------------------------------------

BLOCK_BYTES = 512

#: how the unsynced writes and truncates of each file reach the disk
DATA_MODES = ("drop", "keep", "torn", "zero", "garbage", "blocks")
#: which namespace operations not yet covered by a directory sync survive
NAME_MODES = ("drop", "keep", "subset")


#: what the live LMDB file holds when LMDB may have written it since its last
#: sync: that synced image, or (its pages torn) zeros or garbage
LMDB_MODES = ("synced", "zero", "garbage")


@dataclass(frozen=True)
class CrashState:
    point: int  # the crash happened before events[point]
    data_mode: str
    name_mode: str
    files: dict[str, bytes]
    dirs: frozenset[str]
    #: every file's identity by path, for the checker's own questions
    fids: dict[str, int] = field(default_factory=dict)
    lmdb_mode: str = "synced"

    @property
    def label(self) -> str:
        lmdb = "" if self.lmdb_mode == "synced" else f", {self.lmdb_mode} LMDB"
        return (f"crash before event {self.point} ({self.data_mode} data, "
                f"{self.name_mode} names{lmdb})")

    def digest(self) -> str:
        h = hashlib.sha256()
        for path in sorted(self.dirs):
            h.update(b"d" + path.encode() + b"\0")
        for path, data in sorted(self.files.items()):
            h.update(b"f" + path.encode() + b"\0" + hashlib.sha256(data).digest())
        return h.hexdigest()


@dataclass
class _FileModel:
    synced: bytearray = field(default_factory=bytearray)
    pending: list[Write | Truncate] = field(default_factory=list)


@dataclass
class _NameOp:
    event: Create | MakeDir | Rename | Unlink
    unsynced_dirs: set[str]


def _dirs_of(event: Create | MakeDir | Rename | Unlink) -> set[str]:
    if isinstance(event, Rename):
        return {parent(event.src), parent(event.dst)}
    return {parent(event.path)}


@dataclass
class Replayed:
    """The trace up to a point, fed one event at a time: each file's synced
    bytes and later writes, and every namespace operation with the directories
    whose sync it still awaits."""

    files: dict[int, _FileModel] = field(default_factory=dict)
    names: list[_NameOp] = field(default_factory=list)
    #: the LMDB file being written, and whether it was written since its last sync
    live_lmdb: int | None = None
    lmdb_dirty: bool = False

    def feed(self, event: Event) -> None:
        files = self.files
        if isinstance(event, LiveSnapshot):
            self.live_lmdb, self.lmdb_dirty = event.fid, event.created
        elif isinstance(event, Intent):
            # the commit is applied to LMDB
            self.lmdb_dirty = self.lmdb_dirty or self.live_lmdb is not None
        elif isinstance(event, NAMESPACE_EVENTS):
            self.names.append(_NameOp(event, _dirs_of(event)))
            if isinstance(event, Create):
                files[event.fid] = _FileModel()
        elif isinstance(event, Write | Truncate):
            files.setdefault(event.fid, _FileModel()).pending.append(event)
        elif isinstance(event, Sync):
            model = files.setdefault(event.fid, _FileModel())
            model.synced = _apply_all(model.synced, model.pending)
            model.pending = []
        elif isinstance(event, Capture):
            files[event.fid] = _FileModel(bytearray(event.data))
            if event.fid == self.live_lmdb:
                self.lmdb_dirty = False
        elif isinstance(event, DirSync):
            for op in self.names:
                op.unsynced_dirs.discard(event.path)

    def pending_data(self) -> bool:
        return any(f.pending for f in self.files.values())

    def pending_names(self) -> bool:
        return any(op.unsynced_dirs for op in self.names)

    def namespace(self, *, durable_only: bool) -> tuple[dict[str, int], set[str]]:
        """Path → file and the directories: all of them, or only what directory
        syncs made durable."""
        return _namespace(self.names, "drop" if durable_only else "keep", random.Random(0))


def replay_trace(events: Sequence[Event]) -> Replayed:
    replayed = Replayed()
    for event in events:
        replayed.feed(event)
    return replayed


def _put(buf: bytearray, offset: int, data: bytes) -> None:
    if len(buf) < offset:
        buf.extend(bytes(offset - len(buf)))
    buf[offset : offset + len(data)] = data


def _resize(buf: bytearray, length: int) -> None:
    if len(buf) > length:
        del buf[length:]
    else:
        buf.extend(bytes(length - len(buf)))


def _apply_all(base: bytearray, ops: Sequence[Write | Truncate]) -> bytearray:
    out = bytearray(base)
    for op in ops:
        if isinstance(op, Write):
            _put(out, op.offset, op.data)
        else:
            _resize(out, op.length)
    return out


def _content(model: _FileModel, mode: str, rng: random.Random) -> bytes:
    """A file's bytes after a crash: its synced bytes, then the unsynced
    writes as ``mode`` says."""
    out = bytearray(model.synced)
    ops = model.pending
    if mode == "drop" or not ops:
        return bytes(out)
    if mode == "torn":
        stop = rng.randrange(len(ops))
        for op in ops[:stop]:
            _apply_all_into(out, op)
        last = ops[stop]
        if isinstance(last, Write) and last.data:
            _put(out, last.offset, last.data[: rng.randrange(len(last.data))])
        return bytes(out)
    for op in ops:
        if isinstance(op, Truncate):
            if mode != "blocks" or rng.random() < 0.5:
                _resize(out, op.length)
            continue
        if mode == "keep":
            _put(out, op.offset, op.data)
        elif mode == "zero":
            _put(out, op.offset, bytes(len(op.data)))
        elif mode == "garbage":
            _put(out, op.offset, rng.randbytes(len(op.data)))
        else:
            _write_blocks(out, op, rng)
    return bytes(out)


def _apply_all_into(out: bytearray, op: Write | Truncate) -> None:
    if isinstance(op, Write):
        _put(out, op.offset, op.data)
    else:
        _resize(out, op.length)


def _write_blocks(out: bytearray, op: Write, rng: random.Random) -> None:
    """Each disk block of the write independently: new bytes, old bytes (the
    block never written; the file still grows if a later block landed),
    zeros, or garbage."""
    pos = op.offset
    end = op.offset + len(op.data)
    while pos < end:
        stop = min(end, (pos // BLOCK_BYTES + 1) * BLOCK_BYTES)
        chunk = op.data[pos - op.offset : stop - op.offset]
        pick = rng.random()
        if pick < 0.45:
            _put(out, pos, chunk)
        elif pick < 0.75:
            if len(out) < stop:
                _put(out, len(out), bytes(stop - len(out)))
        elif pick < 0.88:
            _put(out, pos, bytes(len(chunk)))
        else:
            _put(out, pos, rng.randbytes(len(chunk)))
        pos = stop


def _namespace(
    names: Sequence[_NameOp], mode: str, rng: random.Random
) -> tuple[dict[str, int], set[str]]:
    """Apply the durable namespace operations, and the others as ``mode`` says, in order."""
    entries: dict[str, int] = {}
    dirs: set[str] = {""}
    for op in names:
        if op.unsynced_dirs and (mode == "drop" or (mode == "subset" and rng.random() < 0.5)):
            continue
        event = op.event
        if isinstance(event, Create):
            if parent(event.path) in dirs:
                entries[event.path] = event.fid
        elif isinstance(event, MakeDir):
            if parent(event.path) in dirs:
                dirs.add(event.path)
        elif isinstance(event, Unlink):
            _remove(entries, dirs, event.path)
        elif event.src in entries:
            if parent(event.dst) in dirs:
                _remove(entries, dirs, event.dst)
                entries[event.dst] = entries.pop(event.src)
        elif event.src in dirs and parent(event.dst) in dirs:
            _remove(entries, dirs, event.dst)
            for path in [p for p in entries if under(p, event.src)]:
                entries[event.dst + path[len(event.src):]] = entries.pop(path)
            for path in [d for d in dirs if under(d, event.src)]:
                dirs.discard(path)
                dirs.add(event.dst + path[len(event.src):])
    return entries, dirs


def _remove(entries: dict[str, int], dirs: set[str], top: str) -> None:
    for path in [p for p in entries if under(p, top)]:
        del entries[path]
    for path in [d for d in dirs if under(d, top)]:
        dirs.discard(path)


def crash_state(
    events: Sequence[Event], point: int, data_mode: str, name_mode: str, seed: int,
    lmdb_mode: str = "synced", replayed: Replayed | None = None,
) -> CrashState:
    """What the disk may hold after a power loss just before ``events[point]``
    (``replayed``: the trace up to there, if the caller has it)."""
    rng = random.Random(f"{seed}/{point}/{data_mode}/{name_mode}/{lmdb_mode}")
    if replayed is None:
        replayed = replay_trace(events[:point])
    entries, dirs = _namespace(replayed.names, name_mode, rng)
    files = {
        path: _content(replayed.files.get(fid, _FileModel()), data_mode, rng)
        for path, fid in sorted(entries.items())
    }
    if lmdb_mode != "synced" and replayed.lmdb_dirty:
        for path, fid in entries.items():
            if fid == replayed.live_lmdb:
                size = max(len(files[path]), 4 * BLOCK_BYTES)
                files[path] = bytes(size) if lmdb_mode == "zero" else rng.randbytes(size)
    return CrashState(
        point, data_mode, name_mode, files, frozenset(dirs), dict(entries), lmdb_mode
    )


#: the (data, names) modes tried at every point; the random ones only where
#: something is unsynced
FIXED_MODES = (("drop", "drop"), ("keep", "keep"), ("drop", "keep"), ("keep", "drop"))
RANDOM_MODES = (
    ("torn", "keep"), ("zero", "keep"), ("garbage", "keep"), ("blocks", "subset"),
    ("torn", "subset"),
)


def crash_states(events: Sequence[Event], seed: int, *, rounds: int = 1) -> Iterator[CrashState]:
    """Distinct crash states at every point of the trace (identical ones once).

    Every point gets the fixed modes; a point with unsynced data or names also
    gets ``rounds`` seeded draws of each random mode, and one where LMDB may
    have written since its last sync a zeroed and a garbage LMDB file.
    """
    seen: set[str] = set()
    replayed = Replayed()
    for point in range(len(events) + 1):
        if point:
            replayed.feed(events[point - 1])
        modes: list[tuple[str, str, int, str]] = [(d, n, seed, "synced") for d, n in FIXED_MODES]
        if replayed.pending_data() or replayed.pending_names():
            modes += [
                (d, n, seed + r, "synced") for r in range(rounds) for d, n in RANDOM_MODES
            ]
        if replayed.lmdb_dirty:
            modes += [("drop", "keep", seed, "zero"), ("keep", "keep", seed, "garbage")]
        for data_mode, name_mode, s, lmdb_mode in modes:
            state = crash_state(events, point, data_mode, name_mode, s, lmdb_mode, replayed)
            key = state.digest()
            if key not in seen:
                seen.add(key)
                yield state


def materialize(state: CrashState, dest: Path) -> None:
    """Write a crash state into ``dest`` (made here), from the trace's bytes."""
    dest.mkdir(parents=True)
    for path in sorted(state.dirs):
        if path:
            (dest / path).mkdir(parents=True, exist_ok=True)
    for path, data in state.files.items():
        (dest / path).write_bytes(data)
