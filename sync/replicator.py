"""The replicator: ship committed WAL records to the server, pull other hosts' records.

Ship: records after the acknowledged LSN, in LSN order, batched by count,
bytes and time; only records that are both durable and applied locally, so
the server never holds an LSN this node could lose and hand out again. The
acknowledged LSN is persisted in the store and becomes the WAL's retention
floor, which the store keeps from the moment a replicator is first made for
it (before the server was ever reached), across opens without sync: no
segment is removed before the server has it. After a crash the
replicator resumes from the larger of its own record and the server's
(at-least-once delivery; the server ignores duplicates: exactly-once effect).

Pull: other origins' entries after the pull cursor (a server position drawn
in commit order), merged through the local WAL as merge records, which are
durable and replayed like local writes but never shipped back. The cursor
moves in the same record as the merged data.

Faults: transient ones (RemoteUnavailableError) are retried with exponential
backoff, jitter and a cap (tenacity); permanent ones stop the replicator,
whose status then names the error; every entry stays in the WAL.

Threads: one background thread (``start``; ``stop`` and ``start`` again as
often as needed) or the caller's (``run_once``); ``status`` and
``wait_acknowledged`` may be called from any thread. While a
full batch is pushed, a short-lived thread reads and encodes the next one
(pushes themselves stay one at a time, on the shipping thread).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tenacity

from walsync.engine import Store
from walsync.engine.errors import (
    CorruptionError,
    LeaseLostError,
    LSNGapError,
    RemoteDurabilityTimeoutError,
    RemoteUnavailableError,
    ReplicatorStoppedError,
    StoreClosedError,
    SyncError,
    WalsyncError,
)
from walsync.engine.events import LeaseLostEvent
from walsync.engine.identity import NodeIdentity, end_of, owner_of, translate_vv
from walsync.engine.metrics import LATENCY_BOUNDS_NS, Histogram, HistogramSnapshot
from walsync.engine.replication import LastError, ReplicationSource, UnshippedEntry
from walsync.engine.workflow import drop_lease
from walsync.engine.workflow import keys as run_keys

from .incarnation import connect
from .merge import record_to_wire, sibling_to_wire
from .transport import Claim, FencedRun, PushAck, Transport, WireBatch

__all__ = ["Replicator", "ReplicatorOptions", "ReplicatorStats", "ReplicatorStatus"]

log = logging.getLogger("walsync.replicator")

#: how many entries set aside, never shipped, the store lists (the latest ones); see
#: PROTOCOL.md and SyncLedger.unshipped
_UNSHIPPED_KEPT = 100
#: fencing tokens are bigints on the server
_FENCE_LIMIT = 1 << 63


@dataclass(frozen=True)
class ReplicatorOptions:
    batch_records: int = 1000
    batch_bytes: int = 4 * 1024 * 1024
    #: after a commit wakes the shipper, gather more for at most this long
    batch_wait_seconds: float = 0.005
    pull: bool = True
    pull_interval_seconds: float = 1.0
    pull_limit: int = 1000
    retry_initial_seconds: float = 0.05
    retry_max_seconds: float = 5.0


@dataclass
class ReplicatorStatus:
    node_id: str
    transport: str
    running: bool = False
    acked_lsn: int = 0
    applied_lsn: int = 0
    lag_entries: int = 0
    lag_bytes: int = 0
    lag_seconds: float = 0.0
    pull_cursor: int = 0
    server_head: int = 0
    pushed_entries: int = 0
    pulled_entries: int = 0
    retries: int = 0
    conflicts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    last_push_at: float | None = None
    last_pull_at: float | None = None
    stopped_reason: str | None = None
    #: runs whose writes the server refused (run id -> the current lease token)
    lost_runs: dict[str, int] = field(default_factory=dict)
    fenced_runs: int = 0
    #: runs this node leases itself (holder = its node id) whose older writes the
    #: server refused, made before it took the lease or without its token (run id
    #: -> the lease token): not lost, but those writes are not on the server
    stale_refused: dict[str, int] = field(default_factory=dict)
    #: the server's identity (walsync.server): the acknowledged LSN is this server's
    server_id: str | None = None
    #: times the server held less of this store than it had acknowledged (another
    #: server, or one restored from a backup): shipping went on from the server's
    #: position; ``last_reship`` says what was found and from where
    reships: int = 0
    last_reship: str | None = None
    #: node ids this store left because another store (a copy of it) holds them
    node_renewals: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReplicatorStats:
    """Counters since the replicator was made, and lags now (what metrics expose)."""

    node_id: str
    running: bool
    acked_lsn: int
    lag_entries: int
    lag_bytes: int
    lag_seconds: float
    #: seconds per successful push call (one batch of entries)
    push_duration: HistogramSnapshot
    pushed_entries: int
    #: WAL frame bytes of the local records pushed
    pushed_bytes: int
    pulls: int
    pulled_entries: int
    #: retries of a ship-and-pull round after a transient server fault
    retries: int
    conflicts: int
    #: the server's refusals of this node's writes to runs another host leases
    #: (one per run per pushed batch)
    fenced_writes: int
    #: runs taken over by another host
    lost_runs: int
    last_push_unix: float | None
    last_pull_unix: float | None
    last_error_unix: float | None
    #: times shipping went back to a server's position (it held less than acknowledged)
    reships: int = 0
    #: node ids left because a copy of the store holds them
    node_renewals: int = 0


@dataclass(frozen=True)
class _Batch:
    """Records after an acknowledged LSN, as the wire entries of one push."""

    #: the last record read: what the server acknowledges once it has the entries
    through_lsn: int
    entries: WireBatch
    #: WAL frame bytes of the local records
    size_bytes: int
    #: shippable records were left after it (it was cut by a count or byte limit)
    more: bool
    #: the node id its LSNs belong to (engine/identity.py: a batch never spans two)
    node_id: str = ""


#: records an ahead thread reads and decodes between two releases of the GIL: the
#: pushing thread takes it back several times per push (each socket write, the answer)
#: and would otherwise wait out the interpreter's switch interval (5 ms) each time
_YIELD_EVERY = 50


class _Ahead:
    """Builds the next batch on a short-lived thread while the current one is pushed.

    The caller takes the batch (``result``) or waits the thread out (``wait``) before
    it reads the WAL itself again: one reader, one thread at a time.
    """

    def __init__(self, build: Callable[[int, int], _Batch], after_lsn: int,
                 upto_lsn: int) -> None:
        self._batch: _Batch | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(build, after_lsn, upto_lsn),
                                        name="walsync-ship-ahead", daemon=True)
        self._thread.start()

    def _run(self, build: Callable[[int, int], _Batch], after_lsn: int, upto_lsn: int) -> None:
        try:
            self._batch = build(after_lsn, upto_lsn)
        except BaseException as exc:  # noqa: BLE001 - raised again in the shipping thread
            self._error = exc

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> _Batch:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._batch is not None
        return self._batch


class Replicator:
    def __init__(
        self, store: ReplicationSource, transport: Transport,
        options: ReplicatorOptions | None = None,
    ) -> None:
        self.store = store
        self.transport = transport
        self.options = options or ReplicatorOptions()
        self._reader = store.wal_reader()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._acked_cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._fatal: SyncError | None = None
        self._unacked: collections.deque[tuple[int, float]] = collections.deque()
        self._acked = store.sync_ledger.acked_lsn
        if store.retain_floor is None:
            # Held from the first attachment on, and persisted: no checkpoint, compaction
            # or close (here, or in a later open without sync) removes a record the
            # server has not acknowledged, even while the server was never reached.
            store.set_retain_floor(self._acked + 1)
        self._status = ReplicatorStatus(store.node_id, transport.name, acked_lsn=self._acked)
        self._server_checked = False
        #: the incarnation token this store's node id is claimed with on the server
        self._token: str | None = None
        self._server_id: str | None = None
        self._next_pull = 0.0
        self._skipped_cursor: int | None = None
        self._lost_callbacks: list[Callable[[LeaseLostError], None]] = []
        #: written by the replicator's thread only; read by stats()
        self._push_ns = Histogram(LATENCY_BOUNDS_NS, divisor=1e9)
        self._pushed_bytes = 0
        self._pulls = 0
        self._fenced_writes = 0
        self._listening = False
        self._listen()

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> Replicator:
        """Run in a background thread; also enables durability 'remote' on the store.

        Repeatable: a replicator that stopped (``stop``, a permanent error, its thread
        ending) starts again from its acknowledged LSN, asking the server first. A
        running one is left as it is.
        """
        thread = self._thread
        if thread is not None and thread.is_alive():
            if not self._stop.is_set():
                return self
            raise SyncError(
                f"the replicator of {self.store.path} cannot start yet: its thread is still "
                "in a server call made before stop()",
                hint="call stop() again (it waits for the call), then start()",
            )
        if self.store.closed:
            raise StoreClosedError(f"store {self.store.path} is closed: its replicator "
                                   "cannot start")
        self._stop.clear()
        self._fatal = None
        self._status.stopped_reason = None
        self._server_checked = False  # the server may have changed while stopped
        self._listen()
        self.store.attach_replicator(self)
        self._thread = threading.Thread(target=self._loop, name="walsync-replicator",
                                        daemon=True)
        self._status.running = True
        self._thread.start()
        return self

    def stop(self, timeout_seconds: float = 10.0) -> None:
        """Stop the thread (after the call it is in); durability 'remote' is refused
        until ``start`` again, and commits waiting for the server fail at once."""
        self._stop.set()
        self._wake.set()
        with self._acked_cv:
            self._acked_cv.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_seconds)
            if thread.is_alive():
                # it is in a call the server has not answered: it stops after it
                log.warning("sync: the replicator thread is still in a call after %.0f s; "
                            "it stops when the call returns", timeout_seconds)
            else:
                self._thread = None
        self._status.running = False
        self.store.detach_replicator(self, "its replicator was stopped")
        if self._listening:
            self._listening = False
            with contextlib.suppress(ValueError):
                self.store.remove_commit_listener(self._on_commit)

    @property
    def running(self) -> bool:
        """Whether the background thread runs and ships (not stopping, not failed)."""
        thread = self._thread
        return (thread is not None and thread.is_alive() and not self._stop.is_set()
                and self._fatal is None)

    def _listen(self) -> None:
        if not self._listening:
            self.store.add_commit_listener(self._on_commit)
            self._listening = True

    def close(self) -> None:
        self.stop()
        if self._thread is None:  # never close the connection under a running call
            self.transport.close()

    def __enter__(self) -> Replicator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_commit(self, lsn: int) -> None:
        self._unacked.append((lsn, time.monotonic()))
        self._wake.set()

    # -- the loop --------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._run_loop()
        except BaseException as exc:  # the thread ends: say why, never vanish
            log.exception("sync: the replicator thread ended unexpectedly")
            self._fail(SyncError(f"replicator stopped: its thread ended on "
                                 f"{type(exc).__name__}: {exc}"))
        finally:
            self._status.running = False
            with self._acked_cv:  # 'remote' commits waiting fail now, naming why
                self._acked_cv.notify_all()

    def _run_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._with_retries(self.run_once)
            except SyncError as exc:
                if not self._stop.is_set():
                    self._fail(exc)
                return
            except StoreClosedError:
                return
            except WalsyncError as exc:
                self._fail(SyncError(f"replicator stopped: {exc}", hint=exc.hint))
                return
            except Exception as exc:
                # Anything else (a bug, a library's surprise) would end the thread
                # silently while status() says running and 'remote' commits wait
                # out their whole timeout: stop visibly instead.
                log.exception("sync: unexpected error")
                self._fail(SyncError(f"replicator stopped: unexpected {type(exc).__name__}: "
                                     f"{exc}"))
                return
            timeout = max(0.0, self._next_pull - time.monotonic()) if self.options.pull else None
            self._wake.wait(timeout)
            self._wake.clear()
            if self.options.batch_wait_seconds and not self._stop.is_set():
                time.sleep(self.options.batch_wait_seconds)

    def _with_retries(self, fn: Any, deadline: float | None = None) -> Any:
        """``fn()``, retrying transient faults until stop() (or the monotonic
        ``deadline``), then raising the last one."""
        opts = self.options

        def give_up(_state: tenacity.RetryCallState) -> bool:
            return self._stop.is_set() or (deadline is not None
                                           and time.monotonic() >= deadline)

        def pause(seconds: float) -> None:
            if deadline is not None:
                seconds = min(seconds, max(0.0, deadline - time.monotonic()))
            self._pause(seconds)

        def note(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            self._status.retries += 1
            self._record_error(str(exc), stopped=False)
            log.warning("sync: %s (retry %d)", exc, state.attempt_number)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(RemoteUnavailableError),
            # Full jitter: a random wait below min(initial * 2**n, max). (Not
            # wait_exponential_jitter: its jitter defaults to a whole second and
            # its 'initial' argument is deprecated since tenacity 9.)
            wait=tenacity.wait_random_exponential(multiplier=opts.retry_initial_seconds,
                                                  max=opts.retry_max_seconds),
            stop=give_up,
            sleep=pause,
            before_sleep=note,
            reraise=True,
        )
        return retrying(fn)

    def _pause(self, seconds: float) -> None:
        """tenacity's sleep: cut short by stop()."""
        self._stop.wait(seconds)

    def _record_error(self, message: str, *, stopped: bool) -> None:
        """Keep the last error in status and in the store, for `walsync status`."""
        self._status.last_error = message
        self._status.last_error_at = time.time()
        with contextlib.suppress(WalsyncError):
            self.store.sync_ledger.set_last_error(
                LastError(message, self._status.last_error_at, stopped))

    def _fail(self, exc: SyncError) -> None:
        self._fatal = exc
        self._status.running = False
        self._status.stopped_reason = str(exc)
        self._record_error(str(exc), stopped=True)
        log.error("sync stopped: %s", exc)
        with self._acked_cv:
            self._acked_cv.notify_all()

    def run_once(self) -> tuple[int, int]:
        """Ship everything shippable, then pull if due: (entries pushed, entries pulled)."""
        pushed = self.ship()
        pulled = 0
        if self.options.pull and time.monotonic() >= self._next_pull:
            pulled = self.pull()
            self._next_pull = time.monotonic() + self.options.pull_interval_seconds
            if pulled:
                self.ship()  # acknowledge the merge records locally
        return pushed, pulled

    def sync_once(self, timeout_seconds: float | None = None) -> tuple[int, int]:
        """``run_once`` on the caller's thread, retrying transient faults (as the
        background thread does) for at most ``timeout_seconds``, then raising the last
        one; permanent faults are raised at once. For a one-shot sync (`walsync sync
        --once`): a server that stays unreachable ends it instead of retrying forever.
        ``stop()`` from another thread ends the retries too."""
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        pushed, pulled = self._with_retries(self.run_once, deadline)
        return int(pushed), int(pulled)

    def ship(self) -> int:
        """Push every durable, applied record after the acknowledged LSN.

        Batches go out one at a time, in LSN order, each acknowledged only once the
        server confirmed it. While one is in flight the next is read and encoded on a
        short-lived thread (``_Ahead``): the server's work and the client's overlap.
        """
        store = self.store
        self._ensure_connected()
        if store.shippable_lsn < store.applied_lsn:
            store.flush()
        total = 0
        reclaims = 0
        ahead: _Ahead | None = None
        try:
            while not self._stop.is_set():
                try:
                    try:
                        if ahead is not None:
                            pending, ahead = ahead, None
                            batch = pending.result()
                        else:
                            batch = self._build(self._acked, store.shippable_lsn)
                    except LSNGapError:
                        total += self._bootstrap()
                        continue
                    if batch.through_lsn <= self._acked:
                        break
                    if batch.more:  # a full batch: more is waiting, read it during the push
                        ahead = _Ahead(functools.partial(self._build, step=_YIELD_EVERY),
                                       batch.through_lsn, store.shippable_lsn)
                    total += self._push_batch(batch)
                except _Reclaim as exc:
                    # the server no longer takes this store's pushes under its claim (or is
                    # another server): claim again (or take a fresh node id), then go on
                    if ahead is not None:
                        ahead.wait()
                        ahead = None
                    reclaims += 1
                    if reclaims > _MAX_RECLAIMS:
                        raise RemoteUnavailableError(
                            f"pushing from {store.path}: {exc}; claimed node id "
                            f"{store.node_id} {reclaims - 1} times in one round") from None
                    self._server_checked = False
                    self._ensure_connected()
                    continue
                if ahead is not None and self._acked != batch.through_lsn:
                    # the server had acknowledged further: read on from its LSN instead
                    ahead.wait()
                    ahead = None
        finally:
            if ahead is not None:
                # a push failed: the reader is the other thread's until it returns,
                # and the next ship reads again after the acknowledged LSN
                ahead.wait()
        return total

    def _build(self, after_lsn: int, upto_lsn: int, step: int = 0) -> _Batch:
        """The next batch after ``after_lsn``: read, decoded and encoded for the server.
        Runs on the shipping thread or on an ``_Ahead`` one, never on both at once (the
        reader is not thread-safe). With ``step``, records are read ``step`` at a time
        and the GIL is released in between (see _YIELD_EVERY)."""
        opts = self.options
        entries = WireBatch()
        through = after_lsn
        count = size = read_bytes = 0
        chain = self.store.identities
        owner = owner_of(chain, after_lsn + 1)
        end = end_of(chain, owner)
        if end is not None:  # a batch is one node id's: it ends where the next id starts
            upto_lsn = min(upto_lsn, end)
        while count < opts.batch_records and read_bytes < opts.batch_bytes:
            records = self._reader.read(through, upto_lsn,
                                        min(step or opts.batch_records, opts.batch_records - count),
                                        opts.batch_bytes - read_bytes)
            if not records:
                break
            for rec in records:
                if rec.local:
                    wire = self._wire_of(rec.lsn, rec.ops)
                    if len(chain) > 1:
                        _translate(chain, rec.lsn, wire)
                    entries.extend(wire)
                    size += rec.size_bytes
                read_bytes += rec.size_bytes
            count += len(records)
            through = records[-1].lsn
            if step:
                time.sleep(0)  # see _YIELD_EVERY
        if entries:
            self.transport.prepare_push(entries)
        return _Batch(through, entries, size, after_lsn < through < upto_lsn, owner.node_id)

    def _wire_of(self, lsn: int, ops: Any) -> list[dict[str, Any]]:
        """A local record's wire entries, but for those the server cannot hold, which
        are set aside and reported instead of stopping every later record: a value
        that does not decode (an older walsync stored it unchecked), a fence outside
        the server's bigint, a key with NUL. The rest of the record ships."""
        try:
            wire = record_to_wire(lsn, ops)
        except CorruptionError:
            wire = []
            last = {key: (idx, entry) for idx, (key, entry) in enumerate(ops) if key}
            for key, (idx, entry) in sorted(last.items(), key=lambda item: item[1][0]):
                try:
                    (one,) = record_to_wire(lsn, [[key, entry]])
                except CorruptionError as exc:
                    self._set_aside(lsn, key, f"its value does not decode ({exc})")
                    continue
                one["idx"] = idx
                wire.append(one)
        if all(0 <= e["fence"] < _FENCE_LIMIT and "\x00" not in e["key"] for e in wire):
            return wire
        kept = []
        for entry in wire:
            if "\x00" in entry["key"]:
                self._set_aside(lsn, entry["key"], "its key holds a NUL character")
            elif not 0 <= entry["fence"] < _FENCE_LIMIT:
                self._set_aside(lsn, entry["key"],
                                f"its fence {entry['fence']} is outside the server's 0..2**63-1")
            else:
                kept.append(entry)
        return kept

    def _set_aside(self, lsn: int, key: str, reason: str) -> None:
        """Report an entry that is never shipped: in the log, as the last error and in
        the store's list `walsync status` prints (kept across restarts)."""
        message = (f"LSN {lsn}, key {key!r} was not shipped: {reason}; the rest is shipped. "
                   "Write the key again (or delete it) to replace it on the server")
        log.error("sync: %s", message)
        self._record_error(message, stopped=False)
        with contextlib.suppress(WalsyncError, ValueError):
            ledger = self.store.sync_ledger
            listed = ledger.unshipped
            item = UnshippedEntry(lsn, key, reason)
            if item not in listed:  # a batch read again after a failed push
                ledger.set_unshipped([*listed, item][-_UNSHIPPED_KEPT:])

    def _push_batch(self, batch: _Batch) -> int:
        """Push one batch and acknowledge it as far as the server confirmed: the count."""
        entries = batch.entries
        owner = next(i for i in self.store.identities if i.node_id == batch.node_id)
        started = time.perf_counter_ns()
        # a batch of merge records only is pushed too (empty): the server's acknowledged
        # LSN covers them, so it stays the store's own
        sent = self._send(owner, batch.through_lsn, entries)
        if sent is None:  # the server holds less: shipping goes on from its position
            return 0
        ack = sent
        if not entries:
            self._set_acked(batch.through_lsn)
            return 0
        self._push_ns.observe(time.perf_counter_ns() - started)
        if ack.fenced:
            self._fenced_writes += len(ack.fenced)
            self._report_fenced(ack.fenced, entries)
        self._status.pushed_entries += len(entries)
        self._pushed_bytes += batch.size_bytes
        self._status.last_push_at = time.time()
        self._status.server_head = ack.head
        # what this push confirmed, never more: a server ahead of the batch holds
        # entries this store did not send (ignored as duplicates of its own LSNs)
        self._set_acked(batch.through_lsn)
        return len(entries)

    def _send(self, owner: NodeIdentity, through_lsn: int,
              entries: list[dict[str, Any]]) -> PushAck | None:
        """Push under the store's claim of ``owner`` (or, for an id the store retired,
        as re-shipping what the server held of it), following the acknowledged LSN.
        None: the server holds less than that (rewound). Raises _Reclaim when the
        claim no longer holds or the server is another one."""
        current = owner.node_id == self.store.node_id
        batch = entries if isinstance(entries, WireBatch) else WireBatch(entries)
        batch.claim = Claim(self._token if current else None, owner.base_lsn, self._acked)
        ack = self.transport.push(owner.node_id, through_lsn, batch)
        if ack.server_id is not None and ack.server_id != self._server_id:
            raise _Reclaim(f"the server is another one now (id {ack.server_id})")
        if ack.refused == "taken":
            raise _Reclaim(f"another store holds node id {owner.node_id} on the server now")
        if ack.refused == "behind":
            self._rewind(ack.acked_lsn, f"server {self._server_id} holds LSNs of node "
                                        f"{owner.node_id} only up to {ack.acked_lsn}, this "
                                        f"store had {self._acked} acknowledged")
            return None
        return ack

    def _report_fenced(self, fenced: list[FencedRun], entries: list[dict[str, Any]]) -> None:
        """The server refused this node's writes to runs whose lease it does not hold
        (``entries``: the pushed batch, which says what token those writes carried)."""
        for item in fenced:
            run_id, current, holder = item.run_id, item.current, item.holder
            if self._status.lost_runs.get(run_id) == current:
                continue  # told already, for this lease
            if holder == self.store.node_id:
                # This node holds the run's lease: what was refused are its own
                # writes from before it took the lease (e.g. the run's creation)
                # or written without the token. The run was not taken over.
                if self._status.stale_refused.get(run_id) != current:
                    self._status.stale_refused[run_id] = current
                    log.warning("sync: run %s: writes this host made before taking its lease "
                                "(token %d) or without the token were refused by the server",
                                run_id, current)
                continue
            self._status.lost_runs[run_id] = current
            self._status.fenced_runs += 1
            said = (f"run {run_id!r} is leased by {holder} (token {current}), not by this "
                    "host; the server refused this host's writes to it")
            log.error("sync: %s", said)
            # from now on this host's writes to the run are refused locally as well
            # (a run's lease notes live in a Store, where the workflow layer keeps them)
            if isinstance(self.store, Store):
                with contextlib.suppress(WalsyncError):
                    drop_lease(self.store, run_id, upto_token=current, lost_to=holder,
                               current_token=current)
            token, lsn = _refused_writes(entries, run_id)
            self.store.events.emit(LeaseLostEvent(
                lsn=lsn, key=run_keys.run(run_id), run_id=run_id, token=token,
                current_token=current, holder=holder))
            for callback in self._lost_callbacks:
                try:
                    callback(LeaseLostError(said, run_id=run_id, current_token=current,
                                            holder=holder))
                except Exception:
                    log.exception("lease-lost callback failed")

    def on_lease_lost(self, callback: Callable[[LeaseLostError], None]) -> None:
        """Call ``callback(error)`` (from the replicator's thread) when a run is fenced."""
        self._lost_callbacks.append(callback)

    def _bootstrap(self) -> int:
        """Ship state whose WAL records are gone: removed before sync was attached, or
        before the server lost them (a server behind, another server).

        The store's own versions of those LSNs still in the snapshot (not superseded)
        are shipped as they are (their history is gone), one node id's LSNs at a
        time, then the acknowledgement jumps to just below the oldest record the WAL
        still holds (or the id's last LSN), and shipping goes on from the log.
        """
        store = self.store
        oldest = self._reader.oldest_lsn()
        first_available = oldest if oldest is not None else store.shippable_lsn + 1
        if first_available <= self._acked + 1:
            raise LSNGapError(f"the WAL of {store.path} has a hole after LSN {self._acked}")
        chain = store.identities
        owner = owner_of(chain, self._acked + 1)
        end = end_of(chain, owner)
        upto = first_available - 1 if end is None else min(first_available - 1, end)
        after = self._acked
        log.warning("sync: WAL records %d..%d are no longer in the WAL; shipping the "
                    "snapshot's versions of them (node %s)", after + 1, upto, owner.node_id)
        batch = WireBatch()
        total = 0
        for key, sibs in store.iter_siblings():
            for sib in sibs:
                v = sib.version
                if v.origin == owner.node_id and after < v.lsn <= upto:
                    batch.append(sibling_to_wire(key, 0, sib))
            if len(batch) >= self.options.batch_records:
                if self._send(owner, after, batch) is None:
                    return total
                total += len(batch)
                batch = WireBatch()
        if self._send(owner, upto, batch) is None:
            return total
        total += len(batch)
        self._status.pushed_entries += total
        self._set_acked(upto)
        return total

    def _ensure_connected(self) -> None:
        """Claim the node id and find where shipping goes on, once per connection
        (again after start(), or when a push or pull says the claim is gone)."""
        if self._server_checked:
            return
        conn = connect(self.store, self.transport, self._reader, self._acked,
                       self._rewind, self._set_acked)
        self._token = conn.token
        self._server_id = conn.server_id
        status = self._status
        status.server_id = conn.server_id
        status.server_head = conn.head
        if conn.renewed is not None:
            status.node_renewals += 1
            status.node_id = self.store.node_id
        if conn.server_changed:
            self._reset_pull_cursor()
        self._server_checked = True

    def _rewind(self, lsn: int, why: str) -> None:
        """The server holds less of this store than it acknowledged (another server,
        a database restored from a backup): ship again from ``lsn`` (persisted, the
        WAL's retention floor with it), from the WAL where it still holds the records,
        else the snapshot's versions (``_bootstrap``); pull everything again too, the
        server's positions are not the ones the cursor counted."""
        if lsn >= self._acked:
            return
        said = f"{why}; shipping again from LSN {lsn + 1}"
        log.warning("sync: %s", said)
        status = self._status
        status.reships += 1
        status.last_reship = said
        self._acked = lsn
        self.store.sync_ledger.set_acked_lsn(lsn)
        self.store.set_retain_floor(lsn + 1)
        status.acked_lsn = lsn
        self._reset_pull_cursor()

    def _reset_pull_cursor(self) -> None:
        if self._pull_cursor() == 0:
            return
        self._skipped_cursor = 0
        self.store.sync_ledger.set_skipped_pull_cursor(0)
        self.store.apply_remote([], pull_cursor=0)

    def _still_claimed(self) -> bool:
        """Whether the server still gives this store's node id to this store (and
        holds nothing of it this store did not push)."""
        cur = self.store.identities[-1]
        if self._token is None:
            return False
        h = self.transport.hello(cur.node_id, tokens=[self._token], new_token=None,
                                 acked_lsn=max(self._acked, cur.base_lsn),
                                 base_lsn=cur.base_lsn)
        return h.reason is None and h.server_id == self._server_id

    def _set_acked(self, lsn: int) -> None:
        if lsn > self._acked or self.store.retain_floor != self._acked + 1:
            self._acked = max(lsn, self._acked)
            self.store.sync_ledger.set_acked_lsn(self._acked)
            self.store.set_retain_floor(self._acked + 1)
        while self._unacked and self._unacked[0][0] <= self._acked:
            self._unacked.popleft()
        self._status.acked_lsn = self._acked
        with self._acked_cv:
            self._acked_cv.notify_all()

    def pull(self) -> int:
        """Merge other origins' entries after the cursor; returns how many were received."""
        store = self.store
        self._ensure_connected()
        total = 0
        reclaims = 0
        while True:
            cursor = self._pull_cursor()
            page = self.transport.pull(store.node_id, cursor, self.options.pull_limit)
            self._status.server_head = page.head
            self._status.last_pull_at = time.time()
            if page.next <= cursor:
                break
            if not page.entries:
                # Only this node's own entries were passed over: re-reading them
                # after a crash returns nothing, so the cursor need not be durable.
                self._skipped_cursor = page.next
                store.sync_ledger.set_skipped_pull_cursor(page.next)
                if page.next >= page.head:
                    break
                continue
            items = page.siblings  # checked by the transport: no malformed entry here
            mine = store.node_id
            if (any(s.version.vv.get(mine, 0) > self._acked for _, s in items)
                    and not self._still_claimed()):
                # Versions that saw writes of this node id this store never pushed:
                # another store holds the id now (a copy). Merged, they would wrongly
                # dominate this store's own unshipped writes: claim again (a fresh id)
                # first, then read the page again.
                reclaims += 1
                if reclaims > _MAX_RECLAIMS:
                    raise RemoteUnavailableError(
                        f"pulling into {store.path}: node id {mine} keeps being claimed "
                        "by another store")
                self._server_checked = False
                self._ensure_connected()
                continue
            store.apply_remote(items, pull_cursor=page.next)
            total += len(items)
            self._status.pulled_entries += len(items)
            self._status.conflicts += sum(
                1 for key in {k for k, _ in items} if len(store.get_versions(key)) > 1
            )
            if page.next >= page.head:
                break
        self._status.pull_cursor = self._pull_cursor()
        self._pulls += 1
        return total

    def _pull_cursor(self) -> int:
        """The merged cursor (moved with merged data), or further if only own entries followed."""
        ledger = self.store.sync_ledger
        durable = ledger.pull_cursor
        if self._skipped_cursor is None:
            self._skipped_cursor = ledger.skipped_pull_cursor or 0
        return max(durable, self._skipped_cursor)

    # -- for callers -----------------------------------------------------------

    def wait_acknowledged(self, lsn: int, timeout_seconds: float) -> None:
        """Block until the server acknowledged ``lsn`` (durability 'remote').

        Fails at once, naming the cause, when the replicator cannot acknowledge it:
        stopped, stopped by a permanent error, or its thread ended.
        """
        deadline = time.monotonic() + timeout_seconds
        self._wake.set()
        with self._acked_cv:
            while self._acked < lsn:
                dead = self._dead_reason()
                if dead is not None:
                    raise ReplicatorStoppedError(lsn, dead) from self._fatal
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RemoteDurabilityTimeoutError(lsn, timeout_seconds)
                self._acked_cv.wait(left)

    def _dead_reason(self) -> str | None:
        """Why nothing will be acknowledged any more, or None while it may be."""
        if self._fatal is not None:
            return str(self._fatal)
        if self._stop.is_set():
            return "the replicator was stopped"
        thread = self._thread
        if thread is not None and not thread.is_alive():
            if self.store.closed:
                return "the store was closed"
            return "the replicator's thread has ended"
        return None

    @property
    def acked_lsn(self) -> int:
        return self._acked

    @property
    def error(self) -> SyncError | None:
        """The permanent error that stopped the replicator, if any."""
        return self._fatal

    def status(self) -> ReplicatorStatus:
        s = self._status
        s.running = self.running
        if self.store.closed:
            return s  # what it was when the store closed (a late scrape, say)
        s.applied_lsn = self.store.applied_lsn
        s.lag_entries = max(0, s.applied_lsn - self._acked)
        try:  # the shipping thread pops from the left meanwhile
            oldest: float | None = self._unacked[0][1]
        except IndexError:
            oldest = None
        s.lag_seconds = time.monotonic() - oldest if oldest is not None else 0.0
        s.lag_bytes = self._lag_bytes()
        s.pull_cursor = self._pull_cursor()
        return s

    def stats(self) -> ReplicatorStats:
        """A frozen copy of the counters, with the lags computed now; from any thread."""
        s = self.status()
        return ReplicatorStats(
            node_id=s.node_id, running=s.running, acked_lsn=s.acked_lsn,
            lag_entries=s.lag_entries, lag_bytes=s.lag_bytes, lag_seconds=s.lag_seconds,
            push_duration=self._push_ns.snapshot(), pushed_entries=s.pushed_entries,
            pushed_bytes=self._pushed_bytes, pulls=self._pulls,
            pulled_entries=s.pulled_entries, retries=s.retries, conflicts=s.conflicts,
            fenced_writes=self._fenced_writes, lost_runs=s.fenced_runs,
            last_push_unix=s.last_push_at, last_pull_unix=s.last_pull_at,
            last_error_unix=s.last_error_at, reships=s.reships, node_renewals=s.node_renewals,
        )

    def _lag_bytes(self) -> int:
        if self._acked >= self.store.applied_lsn:
            return 0
        # wal_end_bytes, not info().wal_bytes: the active segment's preallocated
        # zeros are not lag
        return max(0, self.store.wal_end_bytes - self._reader.position_bytes())


class _Reclaim(Exception):
    """A push found the store's claim on its node id gone (or another server)."""


#: claims one ship or pull may go through (each answers a server that changed under it)
_MAX_RECLAIMS = 4


def _translate(chain: tuple[NodeIdentity, ...], lsn: int, wire: list[dict[str, Any]]) -> None:
    """A WAL record written under a node id the store renewed since: its entries'
    version vectors as the renewal relabelled them (engine/identity.py)."""
    for e in wire:
        e["vv"] = dict(translate_vv(chain, lsn, e["vv"])[1])


def _refused_writes(entries: list[dict[str, Any]], run_id: str) -> tuple[int, int]:
    """(token, newest LSN) of a pushed batch's writes to ``run_id``, a run another node
    leases: the server refused every one of them."""
    refused = [e for e in entries if run_keys.run_of(e["key"]) == run_id]
    if not refused:
        return 0, 0
    return max(int(e["fence"]) for e in refused), max(int(e["lsn"]) for e in refused)
