"""The replicator: ship committed WAL records to the server, pull other hosts' records.

This module holds the replicator's life: starting and stopping its thread, the
loop, retries, status and counters, and waiting for an acknowledgement
(durability 'remote'). The work is done by its parts: shipping
(sync/shipping.py: local records to the server), pulling (sync/pulling.py: other
hosts' records into the store), both under one link to the server
(sync/link.py: the claim on the node id and the acknowledged LSN).

The acknowledged LSN is persisted in the store and becomes the WAL's retention
floor, which the store keeps from the moment a replicator is first made for it
(before the server was ever reached), across opens without sync: no segment is
removed before the server has it. After a crash the replicator resumes from the
larger of its own record and the server's (at-least-once delivery; the server
ignores duplicates: exactly-once effect).

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

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tenacity

from walsync.engine.errors import (
    LeaseLostError,
    RemoteDurabilityTimeoutError,
    RemoteUnavailableError,
    ReplicatorStoppedError,
    StoreClosedError,
    SyncError,
    WalsyncError,
)
from walsync.engine.metrics import HistogramSnapshot
from walsync.engine.replication import ReplicationSource

from .link import Link, ReplicatorStatus
from .pulling import Puller
from .scope import Scope, load_scope, set_scope
from .shipping import Shipper
from .transport import Transport

__all__ = ["Replicator", "ReplicatorOptions", "ReplicatorStats", "ReplicatorStatus"]

log = logging.getLogger("walsync.replicator")


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


class Replicator:
    def __init__(
        self, store: ReplicationSource, transport: Transport,
        options: ReplicatorOptions | None = None, *, scope: Scope | None = None,
    ) -> None:
        """``scope``: what the store pulls (sync/scope.py), declared on the store
        (durably) when given; None keeps the scope the store declares (every key when
        it declares none)."""
        self.store = store
        self.transport = transport
        self.options = options or ReplicatorOptions()
        if scope is not None:
            set_scope(store, scope)
        self._link = Link(store, transport, self.options)
        self._shipper = Shipper(self._link)
        self._puller = Puller(self._link)
        self._puller.between_pages = self._shipper.ship
        self._stop = self._link.stop
        self._status = self._link.status
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._fatal: SyncError | None = None
        self._next_pull = 0.0
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
        self._link.server_checked = False  # the server may have changed while stopped
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
        with self._link.acked_cv:
            self._link.acked_cv.notify_all()
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
        self._link.unacked.append((lsn, time.monotonic()))
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
            with self._link.acked_cv:  # 'remote' commits waiting fail now, naming why
                self._link.acked_cv.notify_all()

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
            self._link.record_error(str(exc), stopped=False)
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

    def _fail(self, exc: SyncError) -> None:
        self._fatal = exc
        self._status.running = False
        self._status.stopped_reason = str(exc)
        self._link.record_error(str(exc), stopped=True)
        log.error("sync stopped: %s", exc)
        with self._link.acked_cv:
            self._link.acked_cv.notify_all()

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
        """Push every durable, applied record after the acknowledged LSN (see
        sync/shipping.py); returns how many entries were pushed."""
        return self._shipper.ship()

    def pull(self) -> int:
        """Merge other origins' entries after the cursor; returns how many were received."""
        return self._puller.pull()

    @property
    def scope(self) -> Scope:
        """What the store pulls (sync/scope.py)."""
        return load_scope(self.store)

    def set_scope(self, scope: Scope) -> None:
        """Declare what the store pulls, durably; the next pull reads by it (a widened
        scope's new prefixes are filled in from the server's state). Any thread."""
        set_scope(self.store, scope)
        self._wake.set()

    def on_lease_lost(self, callback: Callable[[LeaseLostError], None]) -> None:
        """Call ``callback(error)`` (from the replicator's thread) when a run is fenced."""
        self._shipper.lost_callbacks.append(callback)

    # -- for callers -----------------------------------------------------------

    def wait_acknowledged(self, lsn: int, timeout_seconds: float) -> None:
        """Block until the server acknowledged ``lsn`` (durability 'remote').

        Fails at once, naming the cause, when the replicator cannot acknowledge it:
        stopped, stopped by a permanent error, or its thread ended.
        """
        deadline = time.monotonic() + timeout_seconds
        self._wake.set()
        link = self._link
        with link.acked_cv:
            link.awaited = max(link.awaited, lsn)  # a pull ships it between its pages
            while link.acked < lsn:
                dead = self._dead_reason()
                if dead is not None:
                    raise ReplicatorStoppedError(lsn, dead) from self._fatal
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RemoteDurabilityTimeoutError(lsn, timeout_seconds)
                link.acked_cv.wait(left)

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
        return self._link.acked

    @property
    def error(self) -> SyncError | None:
        """The permanent error that stopped the replicator, if any."""
        return self._fatal

    def status(self) -> ReplicatorStatus:
        s = self._status
        s.running = self.running
        if self.store.closed:
            return s  # what it was when the store closed (a late scrape, say)
        acked = self._link.acked
        s.acked_lsn = acked  # one reading for the ack and the lag computed from it
        s.applied_lsn = self.store.applied_lsn
        s.lag_entries = max(0, s.applied_lsn - acked)
        try:  # the shipping thread pops from the left meanwhile
            first_lsn, first_at = self._link.unacked[0]
        except IndexError:
            first_lsn, first_at = 0, 0.0
        oldest: float | None = first_at if first_lsn > acked else None
        s.lag_seconds = time.monotonic() - oldest if oldest is not None else 0.0
        s.lag_bytes = self._lag_bytes()
        s.pull_cursor = self._puller.cursor()
        return s

    def stats(self) -> ReplicatorStats:
        """A frozen copy of the counters, with the lags computed now; from any thread."""
        s = self.status()
        shipper = self._shipper
        return ReplicatorStats(
            node_id=s.node_id, running=s.running, acked_lsn=s.acked_lsn,
            lag_entries=s.lag_entries, lag_bytes=s.lag_bytes, lag_seconds=s.lag_seconds,
            push_duration=shipper.push_ns.snapshot(), pushed_entries=s.pushed_entries,
            pushed_bytes=shipper.pushed_bytes, pulls=self._puller.pulls,
            pulled_entries=s.pulled_entries, retries=s.retries, conflicts=s.conflicts,
            fenced_writes=shipper.fenced_writes, lost_runs=s.fenced_runs,
            last_push_unix=s.last_push_at, last_pull_unix=s.last_pull_at,
            last_error_unix=s.last_error_at, reships=s.reships, node_renewals=s.node_renewals,
        )

    def _lag_bytes(self) -> int:
        if self._link.acked >= self.store.applied_lsn:
            return 0
        # wal_end_bytes, not info().wal_bytes: the active segment's preallocated
        # zeros are not lag
        return max(0, self.store.wal_end_bytes - self._link.reader.position_bytes())
