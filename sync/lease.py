"""Leases on runs, with fencing tokens.

A host takes a run's lease (server-side, with a TTL) before driving it, and
stamps the lease's token on every write to the run's keys. Each new holder
gets a strictly larger token; the server accepts a leased run's entries only
when they come from the holder (the pushing node is the lease's holder) and
carry its current token. Anything else is refused and recorded, so a host
that was paused past its lease (GC pause, SIGSTOP, a partition) cannot
overwrite the new holder's state when it wakes up, nor can a host that never
took the lease write with a token it read from a pulled or restored run
record: its replicator reports the run as lost.

Expiry is judged by the database's clock alone, so skewed host clocks cannot
make two hosts believe they hold a run at once. A holder renews well before
expiry (every third of the TTL by default) and must stop driving the run as
soon as a renewal fails. A lease that expired with no new holder keeps its
holder and token: the last holder's writes are accepted until another host
takes the run (then it gets a larger token, and they are refused).

The holder is the store's node id. With ``store=``, ``Leases`` keeps what it
acquires in the store's host-local state (``engine.workflow.hold_lease``), so
the workflow layer stamps the token on the run's writes (``Run.fence``) and
refuses writes locally (LeaseLostError) once the lease is released or lost.
Without it, hand the ``Lease`` to ``Workflows.run(..., lease=lease)`` or
``Run.set_lease(lease)``. Take the lease before creating a run, so its first
write carries the token too: a write made before the lease (or without its
token) is refused even from the holder, which the replicator counts under
``stale_refused``, not as a lost run.

Threads: ``Leases`` owns its transport; ``keep_alive`` renews from a
background thread. Use a transport of its own, not the replicator's. From an
event loop, ``keep_alive_async`` renews the same way and hands the outcome to
the loop as a future (the renewals' network calls never run on the loop).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from walsync.engine import Store
from walsync.engine.errors import (
    LeaseHeldError,
    LeaseLostError,
    RemoteUnavailableError,
    SyncConfigError,
)
from walsync.engine.workflow import drop_lease, hold_lease

from .transport import LeaseInfo, Transport

__all__ = ["Lease", "Leases"]


@dataclass(frozen=True)
class Lease:
    run_id: str
    holder: str
    token: int
    expires_at: str
    ttl_seconds: float


class Leases:
    """Take, renew and release leases as ``holder`` (with ``store``: the store's node id)."""

    def __init__(self, transport: Transport, holder: str | None = None, *,
                 ttl_seconds: float = 30.0, store: Store | None = None) -> None:
        if store is None and holder is None:
            raise SyncConfigError("Leases needs the holder's node id, or the store (store=)")
        if store is not None and holder is not None and holder != store.node_id:
            raise SyncConfigError(
                f"lease holder {holder!r} is not the store's node id {store.node_id!r}: the "
                "server accepts a leased run's writes from its holder only")
        self.transport = transport
        self._holder = holder
        self.store = store
        self.ttl_seconds = ttl_seconds
        self._lock = threading.Lock()
        self._keepers: dict[str, threading.Event] = {}
        #: keep_alive_async's futures by run id, settled with None when it stops
        self._async_keepers: dict[str, tuple[asyncio.AbstractEventLoop,
                                             asyncio.Future[LeaseLostError | None]]] = {}

    @property
    def holder(self) -> str:
        """Who takes the leases: the store's node id as it is now, when there is a store."""
        if self.store is not None:
            return self.store.node_id
        assert self._holder is not None
        return self._holder

    def _forget(self, lease: Lease) -> None:
        if self.store is not None and not self.store.closed:
            drop_lease(self.store, lease.run_id, upto_token=lease.token)

    def acquire(self, run_id: str, *, wait_seconds: float = 0.0,
                poll_seconds: float = 0.5) -> Lease:
        """Take the lease (or renew our own); wait up to ``wait_seconds`` for a holder's expiry."""
        deadline = time.monotonic() + wait_seconds
        while True:
            with self._lock:
                got = self.transport.lease_acquire(run_id, self.holder, self.ttl_seconds)
            if got.acquired:
                lease = Lease(run_id, got.holder, got.token, got.expires_at, self.ttl_seconds)
                if self.store is not None:
                    hold_lease(self.store, run_id, lease.token)
                return lease
            if time.monotonic() >= deadline:
                raise LeaseHeldError(
                    f"run {run_id!r} is leased by {got.holder} until {got.expires_at} "
                    f"(server time; now {got.now})"
                )
            time.sleep(min(poll_seconds, max(0.01, deadline - time.monotonic())))

    def renew(self, lease: Lease) -> Lease:
        with self._lock:
            got = self.transport.lease_renew(lease.run_id, lease.holder, lease.token,
                                             lease.ttl_seconds)
        if not got.renewed or got.expires_at is None:
            self._forget(lease)
            raise LeaseLostError(
                f"lease on run {lease.run_id!r} (token {lease.token}) was lost: now held by "
                f"{got.holder} with token {got.token}",
                run_id=lease.run_id, current_token=got.token or 0, holder=got.holder,
            )
        return Lease(lease.run_id, lease.holder, lease.token, got.expires_at,
                     lease.ttl_seconds)

    def release(self, lease: Lease) -> bool:
        """End the lease now; with the store, its writes to the run are refused locally."""
        self.stop_keep_alive(lease.run_id)
        self._forget(lease)
        with self._lock:
            return self.transport.lease_release(lease.run_id, lease.holder, lease.token)

    def held(self) -> list[LeaseInfo]:
        """Leases this holder has on the server (live or expired)."""
        with self._lock:
            return self.transport.leases(self.holder)

    def keep_alive(self, lease: Lease, on_lost: Callable[[LeaseLostError], None]) -> None:
        """Renew every third of the TTL until released; ``on_lost`` is called once if lost.

        A renewal that cannot reach the server is retried until the lease
        would have expired; then the lease counts as lost.
        """
        stop = threading.Event()
        self._keepers[lease.run_id] = stop

        def loop() -> None:
            current = lease
            last_ok = time.monotonic()
            while not stop.wait(current.ttl_seconds / 3):
                try:
                    current = self.renew(current)
                    last_ok = time.monotonic()
                except RemoteUnavailableError:
                    if time.monotonic() - last_ok < current.ttl_seconds:
                        continue
                    self._forget(current)
                    on_lost(LeaseLostError(
                        f"lease on run {lease.run_id!r} could not be renewed before it expired",
                        run_id=lease.run_id))
                    return
                except LeaseLostError as exc:
                    on_lost(exc)
                    return

        threading.Thread(target=loop, name=f"walsync-lease-{lease.run_id}", daemon=True).start()

    def keep_alive_async(self, lease: Lease) -> asyncio.Future[LeaseLostError | None]:
        """``keep_alive`` for code on an event loop: a future of the running loop that
        holds the LeaseLostError once the lease is lost (stop driving the run), or
        None once ``release`` or ``stop_keep_alive`` ended the renewals. Await it,
        or race it against the task driving the run."""
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[LeaseLostError | None] = loop.create_future()

        def lost(exc: LeaseLostError) -> None:
            _settle_threadsafe(loop, outcome, exc)

        self._async_keepers[lease.run_id] = (loop, outcome)
        self.keep_alive(lease, lost)
        return outcome

    def stop_keep_alive(self, run_id: str) -> None:
        stop = self._keepers.pop(run_id, None)
        if stop is not None:
            stop.set()
        waiting = self._async_keepers.pop(run_id, None)
        if waiting is not None:
            _settle_threadsafe(*waiting, None)


def _settle_threadsafe(loop: asyncio.AbstractEventLoop,
                       outcome: asyncio.Future[LeaseLostError | None],
                       value: LeaseLostError | None) -> None:
    def settle() -> None:
        if not outcome.done():
            outcome.set_result(value)

    if loop.is_closed():
        return
    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        return  # closed meanwhile: nobody awaits the outcome
