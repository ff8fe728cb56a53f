"""Leases on runs, with fencing tokens.

A host takes a run's lease (server-side, with a TTL) before driving it, and
stamps the lease's token on every write to the run's keys. Each new holder
gets a strictly larger token; the server refuses entries carrying an older
token than the run's current one, so a host that was paused past its lease
(GC pause, SIGSTOP, a partition) cannot overwrite the new holder's state
when it wakes up: its replicator reports the run as lost.

Expiry is judged by the database's clock alone, so skewed host clocks cannot
make two hosts believe they hold a run at once. A holder renews well before
expiry (every third of the TTL by default) and must stop driving the run as
soon as a renewal fails.

The holder is the store's node id: a replicator that finds its own stale
writes refused while its node holds the lease does not report the run lost.
Take the lease before creating a run and create it under the lease
(``Workflows.run(..., lease=(node_id, token))``), so its first write carries
the token too.

Threads: ``Leases`` owns its transport; ``keep_alive`` renews from a
background thread. Use a transport of its own, not the replicator's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.errors import LeaseHeldError, LeaseLostError, RemoteUnavailableError

from .remote import Transport

__all__ = ["Lease", "Leases"]


@dataclass(frozen=True)
class Lease:
    run_id: str
    holder: str
    token: int
    expires_at: str
    ttl_seconds: float


class Leases:
    def __init__(self, transport: Transport, holder: str, *, ttl_seconds: float = 30.0) -> None:
        self.transport = transport
        self.holder = holder
        self.ttl_seconds = ttl_seconds
        self._lock = threading.Lock()
        self._keepers: dict[str, threading.Event] = {}

    def _call(self, function: str, args: dict[str, Any]) -> Any:
        with self._lock:
            return self.transport.call(function, args)

    def acquire(self, run_id: str, *, wait_seconds: float = 0.0,
                poll_seconds: float = 0.5) -> Lease:
        """Take the lease (or renew our own); wait up to ``wait_seconds`` for a holder's expiry."""
        deadline = time.monotonic() + wait_seconds
        while True:
            doc = self._call("lease_acquire", {"p_run_id": run_id, "p_holder": self.holder,
                                               "p_ttl_seconds": self.ttl_seconds})
            if doc["acquired"]:
                return Lease(run_id, self.holder, int(doc["token"]), str(doc["expires_at"]),
                             self.ttl_seconds)
            if time.monotonic() >= deadline:
                raise LeaseHeldError(
                    f"run {run_id!r} is leased by {doc['holder']} until {doc['expires_at']} "
                    f"(server time; now {doc['now']})"
                )
            time.sleep(min(poll_seconds, max(0.01, deadline - time.monotonic())))

    def renew(self, lease: Lease) -> Lease:
        doc = self._call("lease_renew", {"p_run_id": lease.run_id, "p_holder": lease.holder,
                                         "p_token": lease.token,
                                         "p_ttl_seconds": lease.ttl_seconds})
        if not doc["renewed"]:
            raise LeaseLostError(
                f"lease on run {lease.run_id!r} (token {lease.token}) was lost: now held by "
                f"{doc.get('holder')} with token {doc.get('token')}",
                run_id=lease.run_id, current_token=int(doc.get("token") or 0),
            )
        return Lease(lease.run_id, lease.holder, lease.token, str(doc["expires_at"]),
                     lease.ttl_seconds)

    def release(self, lease: Lease) -> bool:
        self.stop_keep_alive(lease.run_id)
        doc = self._call("lease_release", {"p_run_id": lease.run_id, "p_holder": lease.holder,
                                           "p_token": lease.token})
        return bool(doc["released"])

    def held(self) -> list[dict[str, Any]]:
        """Leases this holder has on the server (live or expired)."""
        return list(self._call("leases", {"p_holder": self.holder}))

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
                    on_lost(LeaseLostError(
                        f"lease on run {lease.run_id!r} could not be renewed before it expired",
                        run_id=lease.run_id))
                    return
                except LeaseLostError as exc:
                    on_lost(exc)
                    return

        threading.Thread(target=loop, name=f"walsync-lease-{lease.run_id}", daemon=True).start()

    def stop_keep_alive(self, run_id: str) -> None:
        stop = self._keepers.pop(run_id, None)
        if stop is not None:
            stop.set()
