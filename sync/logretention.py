"""Compaction of the server's entry log beyond its retention window, run by the sync
worker (sync/PROTOCOL.md, "Retention of the entry log").

Why from the worker: the log would otherwise grow forever, and every database has at
least one worker; the server's lock (a transaction-scoped advisory lock, safe behind a
transaction pooler) lets only one compaction run at a time, so any number of workers
may try: the others return at once. A database without workers (or one that prefers
it) runs ``select walsync_api.compact_log()`` from pg_cron instead.

Threads: ``Compactor`` runs one daemon thread with a transport of its own (a transport
serves one thread at a time); ``stop`` from any thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from walsync.engine.errors import SyncError

from .transport import Compaction, Transport

__all__ = ["DEFAULT_COMPACT_EVERY_SECONDS", "Compactor"]

log = logging.getLogger("walsync.logretention")

#: how often `walsync sync` compacts the server's log by default
DEFAULT_COMPACT_EVERY_SECONDS = 3600.0


class Compactor:
    """Calls ``compact_log`` every ``every_seconds`` (the first time at once) until
    ``stop``. A failed call is logged and tried again next time: compaction is never
    urgent, and a fault of the server shows in the replicator's status anyway."""

    def __init__(self, connect: Callable[[], Transport], every_seconds: float) -> None:
        if not every_seconds > 0:
            raise ValueError(f"every_seconds must be positive, not {every_seconds}")
        self._connect = connect
        self.every_seconds = every_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: the last run's answer (None: none yet), and the last error's message
        self.last: Compaction | None = None
        self.last_error: str | None = None
        self.runs = 0

    def start(self) -> Compactor:
        self._thread = threading.Thread(target=self._loop, name="walsync-compactor",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_seconds: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_seconds)

    def _loop(self) -> None:
        transport: Transport | None = None
        try:
            while not self._stop.is_set():
                try:
                    if transport is None:
                        transport = self._connect()
                    self.last = transport.compact_log()
                    self.runs += 1
                    self.last_error = None
                    if self.last.ran and (self.last.removed_entries
                                          or self.last.collected_tombstones):
                        log.info("sync: compacted the server's log: %d entries removed, %d "
                                 "tombstones collected", self.last.removed_entries,
                                 self.last.collected_tombstones)
                except SyncError as exc:
                    self.last_error = str(exc)
                    log.warning("sync: compacting the server's log failed: %s", exc)
                self._stop.wait(self.every_seconds)
        finally:
            if transport is not None:
                transport.close()
