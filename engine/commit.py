"""The group commit: how a record becomes durable in the WAL and applied to the snapshot.

(Over 500 lines: the two stages and their hand-offs are one state machine under one
lock, whose invariants are read together.)

Commits take a short lock to check ``expect=``, get their LSN and versions
(engine/assign.py), then join a group commit: one of the waiting threads leads
the WAL stage, writing every queued frame with one ``writev`` and one
``fdatasync``, and then acknowledges the whole batch: a commit returns once its
record is durable (as asked), not once it is in LMDB. The applier thread
applies written batches to LMDB, strictly in LSN order, in one transaction,
while the next batch's fdatasync runs. Until then readers in the process see
the records through the snapshot's ``pending`` (a key lookup) or wait for the
applier (a read transaction: SnapshotStore.read); other processes see a
record once it is applied. A large value is not copied on the way: the entry
and the frame keep it as a buffer of its own. A failed write poisons the store
(engine/health.py): records queued behind it are refused; a failed apply
poisons it too, its records stay visible and are applied on reopen.

This is the commit hot path: each commit passes here once, so work is added
here only where it is needed by every commit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .assign import Assigner, Pending
from .errors import NoReplicatorError, WalsyncError
from .health import Health, fresh
from .identity import NodeIdentity
from .metrics import StoreMetrics
from .ops import CommitResult, Delete, Put, durability_of, operations, prepare
from .options import Durability, StoreOptions
from .snapshot import SnapshotStore
from .versions import Sibling
from .wal import WALWriter

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .events import Event, EventBus
    from .replication import Acknowledger

__all__ = ["CommitPipeline"]

log = logging.getLogger("walsync.store")

#: a commit waits while this many acknowledged records are not applied yet
_MAX_UNAPPLIED = 4096
#: the longest an acknowledged batch waits for the applier when nothing wakes it
_APPLY_DELAY_SECONDS = 0.002
#: with nothing to apply, the applier waits this many delays for the next fdatasync
#: before it sleeps until a batch is acknowledged
_IDLE_POLLS = 50


class CommitPipeline:
    """The store's writer side: one per open store (read-only ones never commit)."""

    def __init__(self, path: str, health: Health, assigner: Assigner, snapshot: SnapshotStore,
                 options: StoreOptions, metrics: StoreMetrics, events: EventBus,
                 applied_lsn: int) -> None:
        self._path = path
        self._health = health
        self._assigner = assigner
        self._snapshot = snapshot
        self._options = options
        self._metrics = metrics
        self._events = events
        #: set once the WAL is recovered (a read-only store has none)
        self.wal: WALWriter | None = None
        mutex = threading.Lock()
        #: guards the pipeline; close and flush wait on ``cv``, a committer on its
        #: record's own condition, a leader gathering a batch on ``_gather``
        self._mutex = mutex
        self.cv = threading.Condition(mutex)
        #: records waiting for the WAL stage; ``_leading``: a thread holds the WAL
        self._queue: list[Pending] = []
        self._leading = False
        #: batches written to the WAL, waiting to be applied to LMDB in LSN
        #: order; ``_applying``: a thread is applying
        self._apply_queue: list[list[Pending]] = []
        self._applying = False
        #: an apply failed: no later record can be applied in this process
        self._apply_error: WalsyncError | None = None
        self._preparing = 0
        #: records queued or further along, whose commit has not returned yet
        self._in_pipeline = 0
        self._gather = threading.Condition(mutex)
        self.applied_lsn = applied_lsn
        #: WAL bytes written since the last checkpoint (reset by it, under ``cv``)
        self.bytes_since_checkpoint = 0
        #: asked once ``bytes_since_checkpoint`` reaches checkpoint_every_bytes
        self.on_checkpoint_due: Callable[[], None] = _nothing
        self.listeners: list[Callable[[int], None]] = []
        #: what durability 'remote' waits on (engine/replication.py), if attached
        self.replicator: Acknowledger | None = None
        #: why durability 'remote' is off again (the replicator was stopped)
        self.detached_because: str | None = None
        #: without an attached replicator: the sync worker's acknowledgement, if one runs
        self.worker_acknowledger: Callable[[], Acknowledger | None] = _no_acknowledger
        #: awaited commits (engine/aio.py) have no thread waiting in ``_submit``: one
        #: driver thread, started by the first, leads the stages for them, sleeping
        #: on ``_driver`` (their records' ``waiter``); ``_awaited`` counts those not
        #: done, ``_awaited_done`` those done whose callbacks have not run yet
        self._driver = threading.Condition(mutex)
        self._driver_thread: threading.Thread | None = None
        self._awaited = 0
        self._awaited_done: list[Pending] = []
        #: the applier thread (started by the first written batch) applies written
        #: batches to LMDB off the acknowledgement path, sleeping on ``_apply_wake``;
        #: ``_unapplied`` counts the records acknowledged and not applied yet
        self._apply_wake = threading.Condition(mutex)
        self._applier_idle = False
        #: set when the applier should apply now (see _apply_loop)
        self._apply_go = threading.Event()
        self._applier: threading.Thread | None = None
        self._applier_ident = 0
        self._unapplied = 0
        #: the last LSN acknowledged (a reader's transaction holds at least it)
        self._acked_lsn = applied_lsn
        snapshot.catch_up = self.catch_up

    # -- commits ---------------------------------------------------------------

    def commit(
        self, ops: Sequence[Put | Delete], durability: Durability | str | None,
        notes: Sequence[Event] = (), internal: bool = False,
        on_done: Callable[[int, WalsyncError | None], None] | None = None,
    ) -> CommitResult:
        """A local commit as one atomic record (Store.commit).

        With ``on_done`` (the awaitable commit, engine/aio.py) it returns once the
        record is checked, has its LSN and is queued, without waiting: the
        driver thread calls ``on_done(lsn, error)`` (outside the pipeline's lock; it
        must not block: it holds up the next batch) once the record is durable as
        asked, or with the error that refused it. Durability 'remote' is then the
        caller's to wait for.
        """
        started = time.perf_counter_ns()
        try:
            level = self._options.durability if durability is None \
                else durability_of(durability)
            ops = operations(ops)
            self._health.check_writable()
            # read once: a replicator stopped meanwhile is told apart by its own answer
            replicator = self.replicator
            if level is Durability.REMOTE and replicator is None:
                # a sync worker in another process (engine/handoff.py) acknowledges
                replicator = self.worker_acknowledger()
            if level is Durability.REMOTE and replicator is None:
                why = f" ({self.detached_because})" if self.detached_because else ""
                raise NoReplicatorError(
                    f"durability 'remote' needs a running replicator on store {self._path}"
                    f"{why}; nothing was written"
                )
            if not ops:
                raise ValueError("a commit needs at least one operation")
            # _preparing counts commits on their way to the queue, which a leader
            # gathering a batch waits for (up to group_wait_seconds)
            with self.cv:
                if on_done is None:
                    self._throttle()
                self._preparing += 1
            try:
                options = self._options
                prepared = [prepare(op, options, internal) for op in ops]
            except BaseException:
                with self.cv:
                    self._preparing -= 1
                    if self._leading:
                        self._gather.notify()
                raise
            with self.cv:
                try:
                    self._health.check_writable()
                    item = self._assigner.local(ops, prepared, level is not Durability.NONE)
                finally:
                    self._preparing -= 1
                    if self._leading:
                        self._gather.notify()
                if notes:
                    item.notes = tuple(notes)
                if on_done is not None:
                    self._enqueue(item, on_done)
                    return CommitResult(item.lsn, item.hlc, level)
                self._submit(item)
            self._finish(item)
            if level is Durability.REMOTE:
                assert replicator is not None
                replicator.wait_acknowledged(item.lsn, self._options.remote_timeout_seconds)
        except WalsyncError as exc:
            self._metrics.record_error(exc)
            raise
        self._metrics.commit_ns.observe(time.perf_counter_ns() - started)
        return CommitResult(item.lsn, item.hlc, level)

    def merge(
        self, items: Sequence[tuple[str, Sibling]], meta: dict[str, Any] | None
    ) -> CommitResult | None:
        """Versions from other nodes as one durable merge record (Store.apply_remote)."""
        self._health.check_writable()
        with self.cv:
            self._health.check_writable()
            item = self._assigner.merge(items, meta)
            if item is None:
                return None
            self._submit(item)
        self._finish(item)
        return CommitResult(item.lsn, item.hlc, Durability.LOCAL)

    def renew(self, fork_lsn: int, reason: str) -> NodeIdentity:
        """The durable relabelling record of a node-id renewal (Store.renew_node_id)."""
        with self.cv:
            self._health.check_writable()
            item, ident = self._assigner.renewal(fork_lsn, reason, self._path)
            self._submit(item)
        self._finish(item)
        return ident

    def flush(self) -> None:
        """Make every written record durable (fdatasync), e.g. after 'none' commits,
        and applied: after a flush everything written is shippable (``shippable_lsn``
        counts only applied records) and in every read transaction."""
        self._health.check_writable()
        wal = self.wal
        assert wal is not None
        with self.cv:
            while self._leading:
                self.cv.wait()
            self._leading = True
        try:
            unsynced = wal.synced_lsn < wal.next_lsn - 1
            wal.sync()
            if unsynced:
                self._metrics.record_sync()
        except BaseException as exc:
            raise fresh(self._health.poison(exc, "WAL flush")) from exc
        finally:
            with self.cv:
                self._leading = False
                self._wake()
        self.catch_up()

    def close(self) -> None:
        """Wait for the commits under way to finish, then refuse any more."""
        with self.cv:
            while self._busy():
                self._wake_applier()
                self.cv.wait()
            self._health.closed = True
            self._driver.notify()
            self._apply_wake.notify()
            self._apply_go.set()

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold off group commits (a compaction swapping the snapshot's file):
        committers that queue meanwhile wait, each on its own condition."""
        with self.cv:
            while self._busy():
                self._wake_applier()
                self.cv.wait()
            self._leading = True
        try:
            yield
        finally:
            with self.cv:
                self._leading = False
                self._wake()

    def _busy(self) -> bool:
        return self._leading or bool(self._queue) or self._applying or bool(self._apply_queue)

    def helper_failed(self, exc: BaseException, doing: str) -> None:
        """A helper thread's write or sync failed (the segment preparer's): no commit
        is waiting for it, so the store stops taking writes here and the next one
        says why. The first failure stays the reason."""
        with self.cv:
            if self._health.poisoned is None:
                self._health.poison(exc, doing)

    # -- the two stages --------------------------------------------------------

    def _submit(self, item: Pending) -> None:
        """Queue a record and wait until it is written (and synced, as asked). Holds ``cv``.

        Group commit: the WAL stage is led by one waiting thread at a time,
        which writes (and syncs) every queued record in one batch and then
        acknowledges them all; the applier thread applies written batches to
        LMDB in LSN order, off the acknowledgement path (readers see them
        meanwhile through the snapshot's ``pending``). While one batch is
        applied, the next one's write and fdatasync run.

        Every thread in here is leading, waiting on its record's condition,
        or about to re-check; whenever the WAL stage is free and has work, a
        thread that will take it is either awake or notified.
        """
        self._queue.append(item)
        self._in_pipeline += 1
        if self._leading:
            self._gather.notify()
        try:
            while not item.done:
                if not self._leading and self._queue:
                    self._lead(item)
                else:
                    if item.waiter is None:
                        item.waiter = threading.Condition(self._mutex)
                    item.waiter.wait()
        finally:
            self._in_pipeline -= 1
            if self._leading:
                self._gather.notify()
            self._wake()

    def _enqueue(self, item: Pending,
                 on_done: Callable[[int, WalsyncError | None], None]) -> None:
        """Queue an awaited commit's record for the driver thread. Holds ``cv``."""
        item.on_done = on_done
        item.waiter = self._driver
        self._queue.append(item)
        self._in_pipeline += 1
        self._awaited += 1
        if self._leading:
            self._gather.notify()
        if self._driver_thread is None:
            self._driver_thread = threading.Thread(
                target=self._drive, name=f"walsync-commit-driver {self._path}", daemon=True)
            self._driver_thread.start()
        else:
            self._driver.notify()

    def _drive(self) -> None:
        """The driver thread: a committer on behalf of every awaited commit. It leads
        the WAL stage as ``_submit`` does while one of theirs is queued, and runs
        their callbacks and listeners outside the lock (the applier applies them)."""
        with self.cv:
            while True:
                if self._awaited_done:
                    items, self._awaited_done = self._awaited_done, []
                    self.cv.release()
                    try:
                        for item in items:
                            assert item.on_done is not None
                            item.on_done(item.lsn, item.error)
                        for item in items:
                            if item.error is None and not self._health.closed:
                                self._finish(item)
                    finally:
                        self.cv.acquire()
                elif self._awaited and not self._leading and self._queue:
                    self._lead(_DRIVER)
                    self._wake()
                elif self._health.closed and not self._awaited:
                    self._driver_thread = None
                    return
                else:
                    self._driver.wait()

    def _wake(self) -> None:
        """After a stage ends: wake the thread that can lead each free stage, and
        close/flush waiting for the pipeline. Holds ``cv``."""
        if not self._leading and self._queue:
            waiter = self._queue[0].waiter
            if waiter is not None:
                waiter.notify()
        self.cv.notify_all()

    def _done(self, batch: list[Pending], error: WalsyncError | None) -> None:
        """Finish a batch's commits. Holds ``cv``: batches applied are finished in
        LSN order, so their events are published (one non-blocking put) in it."""
        if error is None:
            self._events.publish(batch)
        for item in batch:
            item.error = error
            item.done = True
            if item.waiter is not None:
                item.waiter.notify()
            if item.on_done is not None:
                # its callback runs on the driver thread, outside the lock
                self._in_pipeline -= 1
                self._awaited -= 1
                self._awaited_done.append(item)

    def _finish(self, item: Pending) -> None:
        if item.error is not None:
            raise fresh(item.error)
        if self.bytes_since_checkpoint >= self._options.checkpoint_every_bytes:
            self.on_checkpoint_due()
        for listener in self.listeners:
            try:
                listener(item.lsn)
            except Exception:
                log.exception("commit listener %r failed", listener)

    def _lead(self, mine: Pending) -> None:
        """The WAL stage: write (and sync) every queued record as one batch, then
        queue it for the apply stage. Entered and left holding ``cv``."""
        self._leading = True
        try:
            wait = self._options.group_wait_seconds
            if wait > 0 and self._others_committing(mine):
                # Other threads are committing right now (preparing a record,
                # or with an earlier one still being applied, after which they
                # often commit again): let them join this batch.
                deadline = time.monotonic() + wait
                while self._others_committing(mine):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._gather.wait(left)
            batch = self._queue
            self._queue = []
            error: WalsyncError | None = None
            poisoned = self._health.poisoned
            if poisoned is not None:
                # A group commit failed while these records waited: writing them
                # now would put them after a hole in the log, or after a failed
                # fsync as if nothing had happened.
                error = self._health.refusal(poisoned)
            else:
                self.cv.release()
                try:
                    error = self._write_wal(batch)
                finally:
                    self.cv.acquire()
            for item in batch:
                item.written = True
            if error is None:
                self._acknowledge(batch)
            else:
                self._done(batch, error)
        finally:
            self._leading = False
            self.cv.notify_all()

    def _acknowledge(self, batch: list[Pending]) -> None:
        """A written batch becomes visible (the snapshot's ``pending``, which readers
        look at before LMDB), goes to the applier and its commits return. Holds ``cv``."""
        pending = self._snapshot.pending
        for item in batch:
            lsn = item.lsn
            for key, entry in item.ops:
                # a meta op (empty key) too: a read transaction then waits for it
                pending[key.encode()] = (lsn, entry)
        self._unapplied += len(batch)
        self._acked_lsn = batch[-1].lsn
        self._apply_queue.append(batch)
        if self._applier is None:
            self._applier = threading.Thread(
                target=self._apply_loop, name=f"walsync-snapshot {self._path}", daemon=True)
            self._applier.start()
        elif self._applier_idle:
            self._apply_wake.notify()
        self._done(batch, None)

    def _apply_loop(self) -> None:
        """The applier thread: applies written batches until the store closes.

        A queued batch is applied once the next WAL write is about to fdatasync
        (``_apply_go``; or a reader, close or a throttled commit waits for it),
        so that its work runs while the leader sleeps in fdatasync instead of
        taking the GIL from the committer that just returned, or after at most
        ``_APPLY_DELAY_SECONDS`` (the last batch before a pause).
        """
        self._applier_ident = threading.get_ident()
        go = self._apply_go
        polls = 0
        with self.cv:
            while True:
                if self._apply_queue and not self._applying:
                    if not self._health.closed and not go.is_set():
                        self.cv.release()
                        try:
                            go.wait(_APPLY_DELAY_SECONDS)
                        finally:
                            self.cv.acquire()
                    go.clear()
                    if self._apply_queue and not self._applying:
                        self._apply_written()
                    polls = 0
                elif self._health.closed:
                    self._applier = None
                    return
                elif polls < _IDLE_POLLS:
                    # commits keep coming: wait for the next one's fdatasync here, so
                    # that acknowledging a batch need not wake this thread
                    polls += 1
                    self.cv.release()
                    try:
                        go.wait(_APPLY_DELAY_SECONDS)
                    finally:
                        self.cv.acquire()
                else:
                    self._applier_idle = True
                    self._apply_wake.wait()
                    self._applier_idle = False
                    polls = 0

    def _start_applying(self) -> None:
        """The WAL leader, its batch written, is about to fdatasync (not holding
        ``cv``: a stale look at the queue only moves the apply a little)."""
        if self._apply_queue and not self._applying:
            self._apply_go.set()

    def _wake_applier(self) -> None:
        """Let the applier apply what is queued now. Holds ``cv``."""
        if self._apply_queue and not self._applying:
            self._apply_go.set()
            if self._applier_idle:
                self._apply_wake.notify()

    def catch_up(self) -> None:
        """Wait until every record acknowledged so far is in LMDB: a read transaction
        (SnapshotStore.read) then holds them all. After a failed apply the store is
        poisoned and nothing more is applied: it returns at once."""
        if threading.get_ident() == self._applier_ident:
            return
        with self.cv:
            target = self._acked_lsn
            while (self.applied_lsn < target and self._apply_error is None
                   and (self._apply_queue or self._applying)):
                self._wake_applier()
                self.cv.wait()

    def _throttle(self) -> None:
        """Hold a new commit while the applier is far behind (a burst of commits
        without fsync), so that ``pending`` stays small. Holds ``cv``."""
        while self._unapplied >= _MAX_UNAPPLIED and self._apply_error is None:
            self._wake_applier()
            self.cv.wait()

    def _others_committing(self, mine: Pending) -> bool:
        """Whether commits other than the queued ones and the leader's own are under way."""
        if self._preparing > 0:
            return True
        return self._in_pipeline - len(self._queue) - mine.written > 0

    def _apply_written(self) -> None:
        """The apply stage: apply every written (and acknowledged) batch, in LSN
        order, in one LMDB transaction. Entered and left holding ``cv``. A failure
        poisons the store; the records stay visible in ``pending`` and are applied
        when the store is reopened."""
        self._applying = True
        try:
            batches = self._apply_queue
            self._apply_queue = []
            error = self._apply_error
            if error is None:
                self.cv.release()
                try:
                    error = self._apply_batches(batches)
                finally:
                    self.cv.acquire()
                if error is None:
                    self._applied(batches[-1][-1].lsn)
                else:
                    self._apply_error = error
            self._unapplied -= sum(len(batch) for batch in batches)
        finally:
            self._applying = False
            self.cv.notify_all()

    def _applied(self, last: int) -> None:
        """Records up to ``last`` are in the snapshot. Holds ``cv``."""
        self.applied_lsn = last
        overlay = self._assigner.overlay
        for key in [k for k, (lsn, _) in overlay.items() if lsn <= last]:
            del overlay[key]
        pending = self._snapshot.pending
        for raw in [k for k, (lsn, _) in pending.items() if lsn <= last]:
            del pending[raw]

    def _write_wal(self, batch: list[Pending]) -> WalsyncError | None:
        wal = self.wal
        assert wal is not None
        before = wal.bytes_written
        sync = any(p.sync for p in batch)
        if wal.before_sync is None:
            wal.before_sync = self._start_applying
        try:
            wal.append([(p.lsn, p.payload) for p in batch], sync)
        except BaseException as exc:  # noqa: BLE001 - every failure poisons the store
            return self._health.poison(
                exc, f"WAL write to segment {wal.segment_first_lsn:016x}.wal")
        self.bytes_since_checkpoint += wal.bytes_written - before
        self._metrics.record_group_commit(len(batch), wal.bytes_written - before, sync)
        return None

    def _apply_batches(self, batches: list[list[Pending]]) -> WalsyncError | None:
        puts, last, hlc, meta_ops = _puts_of(batches)
        try:
            self._snapshot.apply_puts(puts, last, hlc, meta_ops=meta_ops)
        except BaseException as exc:  # noqa: BLE001
            return self._health.poison(
                exc,
                f"applying LSN {batches[0][0].lsn}..{batches[-1][-1].lsn} to the snapshot (the "
                "records are in the WAL and are applied when the store is reopened)",
            )
        return None


def _nothing() -> None:
    return None


def _no_acknowledger() -> Acknowledger | None:
    return None


#: the driver thread's stand-in for a record of its own (it has none) in ``_lead``
_DRIVER = Pending(0, 0, (), b"", False)


def _puts_of(
    batches: list[list[Pending]],
) -> tuple[list[tuple[bytes, bytes | list[bytes]]], int, int, bool]:
    """The snapshot writes of written batches: (pairs, last LSN, highest HLC, any meta op).
    An entry in parts stays in parts: the snapshot seals and joins it in one copy."""
    puts: list[tuple[bytes, bytes | list[bytes]]] = []
    meta_ops = False
    hlc = 0
    for batch in batches:
        for p in batch:
            hlc = max(hlc, p.hlc)
            for key, entry in p.ops:
                if not key:
                    meta_ops = True
                puts.append((key.encode(), entry))
    return puts, batches[-1][-1].lsn, hlc, meta_ops
