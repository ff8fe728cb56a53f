"""The awaitable face of a store: the same store, the same group commit, no second backend.

Why awaiting a commit never blocks the event loop. ``submit`` does on the
loop's thread only what a commit does before it waits: check the operations,
take the pipeline's lock for a moment to give the record its LSN and versions,
and queue it (engine/commit.py). No thread waits for the record: the
pipeline's one driver thread (per store, not per commit) leads the WAL write
and fdatasync for every awaited record queued, sharing the group commit with
any threads committing at the same time, and resolves each record's future
through ``loop.call_soon_threadsafe``, outside the pipeline's lock. So the
loop's thread spends some tens of microseconds per commit and never sleeps on
a disk.

Why cancelling the awaiting task neither cancels nor half-applies the
commit. Once ``submit`` returned, the record is in the pipeline's queue with
its LSN: it is written and applied in full or, if the write fails, refused in
full (the store stops taking writes, engine/health.py), whatever happens to
the task that awaits it. Cancelling only stops the waiting: the commit is
durable a moment later, or the store says why not. A task that must know
should ``await asyncio.shield(...)`` it.

Durability 'remote': the record is first durable locally as above; a
waiter thread (one per store, ending when idle) then waits for the
replicator's acknowledgements in LSN order and resolves the futures.

Reads stay synchronous: ``get``, ``scan`` and the rest read the LMDB snapshot
(memory-mapped, checked against its checksums); they never wait for a WAL
write or sync (at most for the snapshot to take records already acknowledged,
an LMDB transaction without a sync), so they cost the loop what a short
computation does. ``AsyncStore.open`` and ``close`` are
synchronous too (the open replays the WAL; the close waits for the commits
under way and checkpoints): call them before and after the loop's busy time,
or in ``asyncio.to_thread``.

The one wait left on the loop's thread: a commit's checks read the snapshot,
which a compaction (``Store.compact``) or an LMDB map resize closes for their
duration. An awaited commit looks first and, while it is closed, waits on the
loop (``gate_open``); one that starts in the instant a compaction closes it
waits for it as a blocking commit would. Run ``compact`` off the loop.

Threads and loops: an AsyncStore may be used from any number of tasks of one
or several loops, and beside threads using its Store: it is the same store.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

from .errors import NoReplicatorError, WalsyncError
from .events import Event, Subscription
from .health import fresh
from .ops import ANY, Batch, CommitResult, Delete, Put, check_fence, durability_of
from .options import Durability
from .store import Store

if TYPE_CHECKING:
    import os

    from .commit import CommitPipeline
    from .reads import ReadView
    from .replication import Acknowledger
    from .versions import Version

__all__ = ["AsyncBatch", "AsyncStore", "DeferredCommits", "gate_open", "submit"]

#: an idle remote-acknowledgement waiter thread ends after this long
_REMOTE_IDLE_SECONDS = 5.0
#: how often an awaited commit looks again whether a compaction or resize is over
_GATE_POLL_SECONDS = 0.002


def submit(
    store: Store, ops: Sequence[Put | Delete], *, durability: Durability | str | None = None,
    notes: Sequence[Event] = (), internal: bool = False,
) -> tuple[CommitResult, asyncio.Future[None]]:
    """Queue a commit without waiting: its result (LSN, HLC) now, and a future of the
    running loop done once it is durable as asked (or failed with the store's error).

    Everything that can refuse the commit before it is queued (a bad key or
    value, a failed ``expect=``, a closed or poisoned store) raises here, with
    nothing written. Must be called on the loop's thread.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    pipeline: CommitPipeline = store._pipeline
    level = store.options.durability if durability is None else durability_of(durability)
    replicator: Acknowledger | None = None
    if level is Durability.REMOTE:
        # as the pipeline's commit looks it up: the attached replicator, or a sync
        # worker's acknowledgement (engine/handoff.py)
        replicator = pipeline.replicator or pipeline.worker_acknowledger()
        if replicator is None:
            raise NoReplicatorError(
                f"durability 'remote' needs a running replicator on store {store.path}; "
                "nothing was written")

    def on_done(lsn: int, error: WalsyncError | None) -> None:
        # on the driver thread, holding up its next batch: hand over, never block
        if error is None and replicator is not None:
            _remote_waiter(pipeline).wait(replicator, lsn,
                                          store.options.remote_timeout_seconds,
                                          lambda exc: _settle_from_thread(loop, done, exc))
        else:
            _settle_from_thread(loop, done, error)

    result = pipeline.commit(ops, level, notes, internal, on_done=on_done)
    return result, done


async def gate_open(store: Store) -> None:
    """Wait, on the loop, while a compaction or an LMDB map resize holds the snapshot's
    gate: a commit's checks read the snapshot, and would otherwise wait for it on the
    loop's thread (seconds, for a compaction of a large store)."""
    gate = store._snapshot.gate
    while gate.closed:
        await asyncio.sleep(_GATE_POLL_SECONDS)


def _settle_from_thread(loop: asyncio.AbstractEventLoop, done: asyncio.Future[None],
                        error: BaseException | None) -> None:
    # a closed loop: nobody awaits the commit any more, which stands
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, done, error)


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():
        return  # its awaiter was cancelled: the commit went on without it
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(fresh(error) if isinstance(error, WalsyncError) else error)


class _RemoteWaiter:
    """One store's waits for remote acknowledgements, in LSN order, on one thread
    (the replicator acknowledges in LSN order, so a wait behind a longer one
    returns at once)."""

    def __init__(self) -> None:
        self._inbox: queue.SimpleQueue[tuple[Acknowledger, int, float, Any]] = \
            queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def wait(self, replicator: Acknowledger, lsn: int, timeout_seconds: float,
             settle: Any) -> None:
        with self._lock:
            self._inbox.put((replicator, lsn, timeout_seconds, settle))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="walsync-remote-acks")
                self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                replicator, lsn, timeout_seconds, settle = self._inbox.get(
                    timeout=_REMOTE_IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._inbox.empty():
                        self._thread = None
                        return
                continue
            try:
                replicator.wait_acknowledged(lsn, timeout_seconds)
            except WalsyncError as exc:
                settle(exc)
            else:
                settle(None)


_remote_waiters: weakref.WeakKeyDictionary[CommitPipeline, _RemoteWaiter] = \
    weakref.WeakKeyDictionary()
_remote_lock = threading.Lock()


def _remote_waiter(pipeline: CommitPipeline) -> _RemoteWaiter:
    with _remote_lock:
        waiter = _remote_waiters.get(pipeline)
        if waiter is None:
            waiter = _remote_waiters[pipeline] = _RemoteWaiter()
        return waiter


class DeferredCommits:
    """A committer for ``Batch`` that queues each commit (``submit``) instead of
    waiting, and keeps what to await: the workflow layer's async forms run
    the very code of the sync ones through it, then await ``wait()``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.pending: list[asyncio.Future[None]] = []

    def commit(self, ops: Sequence[Put | Delete], *,
               durability: Durability | str | None = None,
               notes: Sequence[Event] = (), internal: bool = False) -> CommitResult:
        result, done = submit(self.store, ops, durability=durability, notes=notes,
                              internal=internal)
        self.pending.append(done)
        return result

    def batch(self, durability: Durability | str | None = None, *, fence: int = 0,
              internal: bool = False) -> Batch:
        if durability is not None:
            durability_of(durability)
        check_fence(fence, "the batch")
        return Batch(self, durability, fence, internal)

    async def wait(self) -> None:
        """Until every commit queued so far is durable; the first failure raises."""
        pending, self.pending = self.pending, []
        for done in pending:
            await done


class AsyncBatch:
    """``async with store.batch() as b: b.put(...)``: committed, awaited, on a clean exit."""

    def __init__(self, store: Store, durability: Durability | str | None, fence: int,
                 internal: bool) -> None:
        if durability is not None:
            durability_of(durability)
        check_fence(fence, "the batch")
        self._store = store
        self._batch = Batch(store, durability, fence, internal)
        self._durability = durability
        self._internal = internal

    @property
    def ops(self) -> list[Put | Delete]:
        return self._batch.ops

    @property
    def notes(self) -> list[Event]:
        return self._batch.notes

    @property
    def result(self) -> CommitResult | None:
        return self._batch.result

    def put(self, key: str, value: Any, *, expect: Any = ANY, fence: int | None = None) -> None:
        self._batch.put(key, value, expect=expect, fence=fence)

    def delete(self, key: str, *, expect: Any = ANY, fence: int | None = None) -> None:
        self._batch.delete(key, expect=expect, fence=fence)

    async def __aenter__(self) -> AsyncBatch:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None and self._batch.ops:
            await gate_open(self._store)
            result, done = submit(self._store, self._batch.ops, durability=self._durability,
                                  notes=self._batch.notes, internal=self._internal)
            await done
            self._batch.result = result


class AsyncStore:
    """A Store whose writes are awaited. Wrap an open store (``AsyncStore(store)``) or
    open one (``AsyncStore.open(path)``); ``store`` is the Store itself, for
    everything else."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @classmethod
    def open(cls, path: str | os.PathLike[str], **kwargs: Any) -> AsyncStore:
        """Store.open (synchronous: it replays the WAL) wrapped."""
        return cls(Store.open(path, **kwargs))

    def close(self) -> None:
        """Store.close: waits for the commits under way, checkpoints, unlocks."""
        self.store.close()

    async def __aenter__(self) -> AsyncStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> str:
        return self.store.path

    # -- writes ----------------------------------------------------------------

    async def commit(
        self, ops: Sequence[Put | Delete], *, durability: Durability | str | None = None,
        notes: Sequence[Event] = (), internal: bool = False,
    ) -> CommitResult:
        """Store.commit, awaited: durable per ``durability`` when the await returns."""
        await gate_open(self.store)
        result, done = submit(self.store, ops, durability=durability, notes=notes,
                              internal=internal)
        await done
        return result

    async def put(self, key: str, value: Any, *, expect: Any = ANY,
                  durability: Durability | str | None = None, fence: int = 0) -> CommitResult:
        """Store.put, awaited."""
        return await self.commit([Put(key, value, expect, fence)], durability=durability)

    async def delete(self, key: str, *, expect: Any = ANY,
                     durability: Durability | str | None = None, fence: int = 0) -> CommitResult:
        """Store.delete, awaited."""
        return await self.commit([Delete(key, expect, fence)], durability=durability)

    def batch(self, durability: Durability | str | None = None, *, fence: int = 0,
              internal: bool = False) -> AsyncBatch:
        """Store.batch as ``async with``: committed (and awaited) when the block exits
        without an exception, discarded otherwise."""
        return AsyncBatch(self.store, durability, fence, internal)

    def submit(self, ops: Sequence[Put | Delete], *,
               durability: Durability | str | None = None) -> Awaitable[None]:
        """Queue a commit now and await it later (``submit`` above)."""
        return submit(self.store, ops, durability=durability)[1]

    # -- reads: synchronous (see the module docstring) ---------------------------

    def get(self, key: str, default: Any = None) -> Any:
        return self.store.get(key, default)

    def get_version(self, key: str) -> Version | None:
        return self.store.get_version(key)

    def scan(self, prefix: str = "", **kwargs: Any) -> Iterator[tuple[str, Any]]:
        return self.store.scan(prefix, **kwargs)

    def keys(self, prefix: str = "", **kwargs: Any) -> list[str]:
        return self.store.keys(prefix, **kwargs)

    def snapshot(self) -> AbstractContextManager[ReadView]:
        """A consistent read view: ``with astore.snapshot() as view:``."""
        return self.store.snapshot()

    # -- events ------------------------------------------------------------------

    def events(self, **kwargs: Any) -> Subscription:
        """A subscription (Store.events.subscribe's arguments) to iterate with ``async for``."""
        return self.store.events.subscribe(**kwargs)

    @asynccontextmanager
    async def subscribe(self, **kwargs: Any) -> AsyncIterator[Subscription]:
        """``async with astore.subscribe(kinds=("step",)) as sub: async for e in sub:``"""
        sub = self.store.events.subscribe(**kwargs)
        try:
            yield sub
        finally:
            sub.close()
