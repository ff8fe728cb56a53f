"""File-fault injection through the engine's file layer (``engine._fs``).

:class:`SeamFaults` wraps every ``_fs`` operation, records the order in which
the test's own thread calls them, and injects one planned fault at the Nth
such call: an error (EIO once, EIO from then on, ENOSPC from then on for the
operations that take space), or, inside the operation, an EINTR or a short
write from the ``os`` call beneath it (which ``_fs`` must absorb), or a short
write acknowledged by the seam itself (which the WAL must refuse to count as
written). Operations of the store's helper threads are recorded apart, with the
thread's name: a case either fails the Nth operation of the test's thread (and
helpers' operations only once a persistent fault is on), or the Nth operation
of one helper thread (the segment preparer, the background checkpoint), which
the workload lets finish before it goes on, so that "the Nth" means one thing.

:func:`run_workload` drives a store through creation, commits with segment
rotation, checkpoints (in the background and asked for), close, an open that
replays the whole WAL into an empty snapshot, a repair of a damaged sealed
segment and a last open; a :class:`Ledger` keeps what was acknowledged and the
one call that failed.
:func:`check_case` then judges one case: the failure, if any, was one of the
project's errors; a fault that fired was noticed (an error surfaced, or the
store was poisoned: a helper thread's failed write stops the store as a
commit's does); a poisoned store refused further writes without touching a
file, and kept serving reads; once the fault is lifted, opening (after a
repair if the damage step had been reached) shows every acknowledged commit,
and the failed commit wholly or not at all.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from walsync import engine
from walsync.engine import Delete, Put, Store, StorePoisonedError, _fs
from walsync.engine.layout import StoreLayout
from walsync.engine.record import FRAME_HEADER_BYTES, SEGMENT_HEADER_BYTES

#: every operation of the file layer (the composite ones call the others
#: through the module, so a fault in those shows up too)
SEAM_OPS = (
    "open_append", "open_segment", "open_lock", "make_dir", "writev", "pwrite", "zero_fill",
    "copy_file", "fdatasync", "fsync", "fsync_dir", "fsync_file", "truncate", "rename",
    "unlink", "remove_tree",
)
#: operations that write bytes: short writes apply to these
WRITE_OPS = frozenset({"writev", "pwrite"})
#: operations whose ``os`` call beneath can report EINTR (writes and syncs)
INTERRUPTIBLE_OPS = frozenset(
    {"writev", "pwrite", "fdatasync", "fsync", "fsync_dir", "fsync_file"}
)
#: operations that need free space; after an ENOSPC they keep failing
SPACE_OPS = frozenset(
    {"open_append", "open_segment", "open_lock", "make_dir", "writev", "pwrite",
     "zero_fill", "copy_file"}
)
#: after a commit failed, the store must not call these again on the same handle
DATA_OPS = frozenset({"writev", "pwrite", "zero_fill", "fdatasync", "fsync", "fsync_dir",
                      "fsync_file", "rename", "copy_file"})

#: the modes of a case. ``eio``/``eio-persistent``/``enospc``/``short-seam``
#: make the operation fail (the store must say so); ``eintr``/``short`` must be
#: absorbed by ``_fs`` (the workload must finish as if nothing happened)
MODES = ("eio", "eio-persistent", "enospc", "eintr", "short", "short-seam")
ABSORBED_MODES = frozenset({"eintr", "short"})
#: the store's helper threads whose file operations go through the seam (by the
#: start of their names), and the modes their operations are failed with
HELPER_THREADS = ("walsync-prepare-segment", "walsync-checkpoint")
HELPER_MODES = ("eio", "enospc")

SEGMENT_BYTES = 4096
STORE_OPTIONS: dict[str, Any] = {
    "segment_bytes": SEGMENT_BYTES,
    # checkpoints only where the workload asks for them: a background one would
    # make the order of operations depend on timing
    "checkpoint_every_bytes": 1 << 40,
}


@contextmanager
def fast_dir(fallback: Path) -> Iterator[Path]:
    """A fresh directory on tmpfs where there is one (else ``fallback``): every
    case syncs dozens of times, and what is tested is what the engine does with
    a failure, not how fast the disk syncs."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield fallback
        return
    path = Path(tempfile.mkdtemp(prefix="walsync-faults-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def applies(mode: str, op: str) -> bool:
    """Whether ``mode`` means anything for operation ``op``."""
    if mode in ("short", "eintr"):
        return op in (WRITE_OPS if mode == "short" else INTERRUPTIBLE_OPS)
    if mode == "short-seam":
        return op == "writev"
    return True


@dataclass
class Call:
    op: str
    target: str
    background: bool
    after_fault: bool
    thread: str = ""


@dataclass
class SeamFaults:
    """Wraps every ``engine._fs`` operation; fails the ``at``-th call of the test's
    thread, or with ``thread`` the ``at``-th call of the helper threads so named."""

    mode: str | None = None
    at: int = 0
    thread: str | None = None
    calls: list[Call] = field(default_factory=list)
    fired: Call | None = None
    #: what the fault did inside the operation (eintr / short): os-level calls hit
    inner_hits: int = 0
    _main_count: int = 0
    _helper_count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _originals: dict[str, Callable[..., Any]] = field(default_factory=dict)

    @contextmanager
    def installed(self) -> Iterator[SeamFaults]:
        for name in SEAM_OPS:
            real = getattr(_fs, name)
            self._originals[name] = real
            setattr(_fs, name, self._wrap(name, real))
        try:
            yield self
        finally:
            for name, real in self._originals.items():
                setattr(_fs, name, real)
            self._originals.clear()

    @property
    def main_ops(self) -> list[str]:
        return [c.op for c in self.calls if not c.background]

    def helper_ops(self, thread: str) -> list[str]:
        return [c.op for c in self.calls if c.thread.startswith(thread)]

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return self._call(name, real, args, kwargs)

        wrapper.__name__ = name
        return wrapper

    def _call(self, op: str, real: Callable[..., Any], args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
        current = threading.current_thread()
        background = current is not threading.main_thread()
        target = _target_of(args[0]) if args else ""
        with self._lock:
            call = Call(op, target, background, self.fired is not None, current.name)
            self.calls.append(call)
            if self.thread is None:
                if not background:
                    self._main_count += 1
                mine = not background and self._main_count == self.at
            else:
                if current.name.startswith(self.thread):
                    self._helper_count += 1
                mine = current.name.startswith(self.thread) and self._helper_count == self.at
            mine = mine and self.mode is not None and self.fired is None
            if mine:
                self.fired = call
            code = self._code_after_fault(op) if call.after_fault else None
        if mine:
            return self._fire(op, real, args, kwargs, target)
        if code is not None:
            raise _os_error(code, target)
        return real(*args, **kwargs)

    def _code_after_fault(self, op: str) -> int | None:
        if self.mode == "eio-persistent":
            return errno.EIO
        if self.mode == "enospc" and op in SPACE_OPS:
            return errno.ENOSPC
        return None

    def _fire(self, op: str, real: Callable[..., Any], args: tuple[Any, ...],
              kwargs: dict[str, Any], target: str) -> Any:
        if self.mode in ("eio", "eio-persistent"):
            raise _os_error(errno.EIO, target)
        if self.mode == "enospc":
            raise _os_error(errno.ENOSPC, target)
        if self.mode == "short-seam":
            # a write that stops half way and reports it: the caller must notice
            fd, buffers = args
            data = b"".join(buffers)
            half = len(data) // 2
            os.write(fd, data[:half])
            return half
        with self._os_glitch():
            return real(*args, **kwargs)

    @contextmanager
    def _os_glitch(self) -> Iterator[None]:
        """For the one operation under test: its first write (short mode) or its
        first write or sync (eintr mode) in this thread misbehaves once."""
        names: tuple[str, ...] = ("writev", "write", "pwrite")
        if self.mode == "eintr":
            names += ("fdatasync", "fsync")
        saved = {n: getattr(os, n) for n in names}
        owner = threading.get_ident()
        state = {"done": False}

        def glitch(name: str) -> Callable[..., Any]:
            real = saved[name]

            def call(*args: Any) -> Any:
                if state["done"] or threading.get_ident() != owner:
                    return real(*args)
                state["done"] = True
                self.inner_hits += 1
                if self.mode == "eintr":
                    raise InterruptedError(errno.EINTR, os.strerror(errno.EINTR))
                return _short_write(name, saved, args)

            return call

        for n in names:
            setattr(os, n, glitch(n))
        try:
            yield
        finally:
            for n, real in saved.items():
                setattr(os, n, real)


def _short_write(name: str, real: dict[str, Callable[..., Any]], args: tuple[Any, ...]) -> int:
    """Write at most half (at least one byte) of what was asked; report the count."""
    if name == "writev":
        fd, buffers = args
        data = b"".join(bytes(b) for b in buffers)
        return int(real["write"](fd, data[: max(1, len(data) // 2)]))
    if name == "write":
        fd, data = args
        return int(real["write"](fd, bytes(data)[: max(1, len(data) // 2)]))
    fd, data, offset = args
    return int(real["pwrite"](fd, bytes(data)[: max(1, len(data) // 2)], offset))


def _target_of(arg: Any) -> str:
    """The file an operation is about: its path, or the path of its descriptor."""
    if isinstance(arg, Path):
        return str(arg)
    if isinstance(arg, int):
        try:
            return os.readlink(f"/proc/self/fd/{arg}")
        except OSError:
            return ""
    return ""


def _os_error(code: int, target: str) -> OSError:
    message = f"injected: {os.strerror(code)}"
    return OSError(code, message, target) if target else OSError(code, message)


# -- the workload -------------------------------------------------------------

Ops = list[Put | Delete]


def ops_of(i: int) -> Ops:
    """Commit ``i``: ~1 KiB puts (a segment holds about three), a delete, or a
    three-key batch (a failed one must show wholly or not at all)."""
    pad = "x" * (900 + 13 * i)
    if i % 4 == 3:
        return [Put(f"b{j}", {"i": i, "j": j, "pad": pad[:200]}) for j in range(3)]
    if i % 6 == 5:
        return [Delete(f"k{(i - 1) % 3}")]
    return [Put(f"k{i % 3}", {"i": i, "pad": pad})]


def durability_of(i: int) -> str:
    # some 'none' commits, so that sealing a segment has unsynced bytes to sync
    return "none" if i % 5 == 2 else "local"


def apply_ops(state: dict[str, Any], ops: Ops) -> dict[str, Any]:
    out = dict(state)
    for op in ops:
        if isinstance(op, Put):
            out[op.key] = op.value
        else:
            out.pop(op.key, None)
    return out


@dataclass
class Ledger:
    """What the workload was told: acknowledged state, and the call that failed."""

    acknowledged: dict[str, Any] = field(default_factory=dict)
    commits: int = 0
    failed_ops: Ops | None = None
    error: BaseException | None = None
    step: str = ""
    #: the store handle that was open when the failure came (None if none was)
    store: Store | None = None
    damaged: bool = False
    #: why a store handle was poisoned when the workload closed it (a helper
    #: thread's failure poisons the store without failing the call under way)
    poisoned: str | None = None


def settle(store: Store) -> None:
    """Wait until the segment preparer (a background thread) is idle.

    Whether a commit rotates to a prepared segment early depends on whether
    that file is ready yet; waiting first makes the order of the test thread's
    file operations the same in every run, so that "the Nth" means one thing.
    """
    preparer = getattr(store._pipeline.wal, "_preparer", None)
    if preparer is None:
        return
    with preparer._cond:
        while preparer._busy or preparer._wanted:
            preparer._cond.wait(1.0)


def checkpoint_in_background(store: Store, ledger: Ledger, step: str) -> None:
    """Have the checkpoint thread run one checkpoint, as a commit does once enough WAL
    was written, and wait for it: its operations then come in one order in every run."""
    ledger.step = step
    settle(store)
    if store.poisoned is not None:
        return  # the checkpoint thread does nothing for a poisoned store
    real = store._checkpointer.run
    finished = threading.Event()

    def traced(**kwargs: Any) -> Any:
        try:
            # with a new base, as when the WAL above the last one outweighs the
            # snapshot: the copy the checkpoint thread then makes is swept too
            return real(**{**kwargs, "new_base": True})
        finally:
            finished.set()

    store._checkpointer.run = traced  # type: ignore[method-assign]
    try:
        store._checkpointer.request()
        if not finished.wait(60):
            raise AssertionError("the background checkpoint did not finish within 60 s")
    finally:
        del store._checkpointer.run


def _close(store: Store, ledger: Ledger, step: str) -> None:
    settle(store)
    ledger.step = step
    ledger.store = None
    if store.poisoned is not None and ledger.poisoned is None:
        ledger.poisoned = str(store.poisoned)
    store.close()


def _commit_all(store: Store, ledger: Ledger, first: int, count: int) -> None:
    for i in range(first, first + count):
        settle(store)
        ops = ops_of(i)
        ledger.step = f"commit {i}"
        ledger.failed_ops = ops
        store.commit(ops, durability=durability_of(i))
        ledger.failed_ops = None
        ledger.acknowledged = apply_ops(ledger.acknowledged, ops)
        ledger.commits += 1


def _damage_sealed_segment(path: Path) -> None:
    """Flip a payload byte of the last frame of the first segment (sealed, with
    segments after it): open refuses, repair cuts it."""
    segments = StoreLayout(path).list_segments()
    assert len(segments) >= 2, f"the workload left {len(segments)} segment(s)"
    data = bytearray(segments[0][1].read_bytes())
    assert len(data) > SEGMENT_HEADER_BYTES + FRAME_HEADER_BYTES
    data[-3] ^= 0xFF
    segments[0][1].write_bytes(bytes(data))


def run_workload(path: Path, ledger: Ledger) -> None:
    """The workload; raises what a step raised (the ledger says which step)."""
    ledger.step = "create"
    store = Store.open(path, **STORE_OPTIONS)
    ledger.store = store
    settle(store)
    ledger.step = "set retain floor"
    store.set_retain_floor(1)  # every segment stays, for the replay below
    _commit_all(store, ledger, 0, 6)
    checkpoint_in_background(store, ledger, "background checkpoint 1")
    _commit_all(store, ledger, 6, 4)
    _close(store, ledger, "close 1")
    # an empty snapshot: the next open replays the whole WAL (test's own I/O)
    shutil.rmtree(path / "snapshot")
    ledger.step = "open with replay"
    store = Store.open(path, **STORE_OPTIONS)
    ledger.store = store
    settle(store)
    ledger.step = "checkpoint"
    store.set_retain_floor(None)
    store.checkpoint()
    store.set_retain_floor(store.next_lsn)  # keep the next segments, for the repair
    _commit_all(store, ledger, 10, 4)
    checkpoint_in_background(store, ledger, "background checkpoint 2")
    _commit_all(store, ledger, 14, 3)
    _close(store, ledger, "close 2")
    _damage_sealed_segment(path)
    ledger.damaged = True
    ledger.step = "repair"
    report = engine.repair(path)
    assert report.damaged, report
    ledger.step = "open after repair"
    store = Store.open(path, **STORE_OPTIONS)
    ledger.store = store
    _commit_all(store, ledger, 17, 2)
    _close(store, ledger, "close 3")
    ledger.step = "done"


def record_workload(path: Path) -> SeamFaults:
    """A clean run of the workload: its calls (``main_ops``, ``helper_ops(thread)``)."""
    faults = SeamFaults()
    ledger = Ledger()
    with faults.installed():
        run_workload(path, ledger)
    assert ledger.step == "done"
    assert ledger.poisoned is None, ledger.poisoned
    return faults


# -- judging one case -----------------------------------------------------------


def check_case(path: Path, mode: str, at: int, thread: str | None = None) -> list[str]:
    """Run the workload with the fault ``mode`` at the ``at``-th operation (of the
    helper threads named ``thread``, if given), then recover without it; return the
    violations found (empty: the case passed)."""
    faults = SeamFaults(mode, at, thread)
    ledger = Ledger()
    problems: list[str] = []
    with faults.installed():
        try:
            run_workload(path, ledger)
        except engine.WalsyncError as exc:
            ledger.error = exc
        except BaseException as exc:  # noqa: BLE001 - any other error is a finding
            ledger.error = exc
            problems.append(f"{ledger.step}: raised {type(exc).__name__}: {exc}")
        if faults.fired is None:
            problems.append("the fault was never reached")
        elif mode in ABSORBED_MODES:
            if faults.inner_hits != 1:
                problems.append(f"{mode}: the os call beneath {faults.fired.op} was not hit")
            if ledger.error is not None:
                problems.append(f"{mode} in {faults.fired.op} was not absorbed: {ledger.error!r}")
        elif ledger.error is None and not _may_be_ignored(faults.fired) and (
                thread is None or ledger.poisoned is None):
            # nobody noticed: no call failed and (for a helper thread's failure,
            # which no call waits for) the store was not poisoned either
            problems.append(f"{faults.fired.op} of {faults.fired.target} failed on thread "
                            f"{faults.fired.thread} and the workload went on as if not")
        if ledger.error is not None and mode not in ABSORBED_MODES:
            problems += _check_error(ledger.error, mode)
        if ledger.error is not None and ledger.store is not None:
            problems += _check_handle(ledger.store, ledger, faults)
        if ledger.store is not None:
            mark = len(faults.calls)
            _close_quietly(ledger.store, problems)  # the disk is still failing
            if ledger.error is not None and ledger.step.startswith("commit"):
                problems += _check_no_wal_io(faults.calls[mark:])
    if mode not in ABSORBED_MODES or ledger.error is not None:
        problems += check_recovered(path, ledger)
    fired = f"{faults.fired.op} {faults.fired.target}" if faults.fired else "?"
    return [f"{mode} at op {at} ({fired}, step {ledger.step!r}): {p}" for p in problems]


def _check_error(exc: BaseException, mode: str) -> list[str]:
    """One of the project's errors, caused by the injected OSError: DiskFullError
    (with its hint) exactly when that was ENOSPC."""
    if not isinstance(exc, engine.WalsyncError):
        return []  # already reported
    cause = exc.__cause__
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    if cause is None:
        return [f"{exc!r} does not carry the OSError that caused it"]
    expected = errno.ENOSPC if mode == "enospc" else errno.EIO
    problems = []
    if cause.errno != expected:
        problems.append(f"caused by {cause!r}, not errno {errno.errorcode[expected]}")
    full = isinstance(exc, engine.DiskFullError)
    if full != (cause.errno == errno.ENOSPC):
        problems.append(f"{type(exc).__name__} for {cause!r}")
    if full and ("disk full" not in str(exc) or "free disk space" not in exc.hint):
        problems.append(f"a disk-full error that does not say so: {exc} / {exc.hint}")
    if not exc.hint:
        problems.append(f"{type(exc).__name__} has no hint")
    return problems


def _check_no_wal_io(calls: list[Call]) -> list[str]:
    """After a commit failed, closing writes and syncs nothing in the WAL: a
    sync that now reported success could hide pages the failed one lost."""
    touched = [f"{c.op} {Path(c.target).name}" for c in calls
               if not c.background and (c.op in DATA_OPS or c.op == "truncate")
               and "wal" in (Path(c.target).parent.name, Path(c.target).name)]
    return [f"closing after a failed commit touched the WAL: {touched}"] if touched else []


def _may_be_ignored(call: Call) -> bool:
    """Failures that lose nothing and may be logged and passed over: removing the
    unused preallocated segment, emptying the lock file when letting it go."""
    name = Path(call.target).name
    return (call.op == "unlink" and name == "prepared.tmp") or (
        call.op == "truncate" and name == "LOCK"
    )


def _check_handle(store: Store, ledger: Ledger, faults: SeamFaults) -> list[str]:
    """A handle that saw a write fail: refuses writes without touching a file,
    says why, and still reads what was acknowledged."""
    problems: list[str] = []
    exc = ledger.error
    if not ledger.step.startswith("commit"):
        return problems
    if not isinstance(exc, StorePoisonedError):
        problems.append(f"commit failed with {exc!r}, not StorePoisonedError")
    elif store.path not in str(exc):
        problems.append(f"the error does not name the store: {exc}")
    if store.poisoned is None:
        problems.append("the store is not poisoned after a failed commit")
        return problems
    before = len(faults.calls)
    try:
        store.put("later", 1)
        problems.append("a write was accepted after a failed commit")
    except StorePoisonedError:
        pass
    touched = [c.op for c in faults.calls[before:] if not c.background]
    if touched:
        problems.append(f"a refused write touched files: {touched}")
    if dict(store.scan()) != ledger.acknowledged:
        problems.append("reads after the failure differ from the acknowledged state")
    return problems


def _close_quietly(store: Store, problems: list[str]) -> None:
    try:
        store.close()
    except engine.WalsyncError:
        pass
    except BaseException as exc:  # noqa: BLE001
        problems.append(f"close raised {type(exc).__name__}: {exc}")


def check_recovered(path: Path, ledger: Ledger) -> list[str]:
    """Open without the fault (repairing first if the damage was made and not yet
    repaired); every acknowledged commit is there, the failed one whole or absent."""
    problems: list[str] = []
    if not (path / "STORE").exists():
        if ledger.acknowledged:
            problems.append("the STORE file is gone but commits were acknowledged")
        return problems
    try:
        store = Store.open(path, **STORE_OPTIONS)
    except engine.CorruptionError:
        if not ledger.damaged:
            raise
        engine.repair(path)
        store = Store.open(path, **STORE_OPTIONS)
    try:
        state = dict(store.scan())
        allowed = [ledger.acknowledged]
        if ledger.failed_ops is not None:
            allowed.append(apply_ops(ledger.acknowledged, ledger.failed_ops))
        if state not in allowed:
            lost = sorted(k for k, v in ledger.acknowledged.items() if state.get(k) != v)
            extra = sorted(set(state) - set(allowed[-1]))
            problems.append(f"after recovery the state is not the acknowledged one "
                            f"(differing keys {lost}, extra {extra})")
        store.put("after-recovery", {"ok": True})
    finally:
        store.close()
    with Store.open(path, **STORE_OPTIONS) as again:
        if again.get("after-recovery") != {"ok": True}:
            problems.append("a commit after recovery was lost")
    if not ledger.damaged:
        report = engine.verify(path)
        if not report.ok:
            problems.append(f"verify after recovery: {report.damage}")
    return problems
