"""A replicator's link to one server: the claim on the node id, the acknowledged LSN.

Shipping (sync/shipping.py) and pulling (sync/pulling.py) both act under the claim
and both may find it gone or the server changed; the replicator (sync/replicator.py)
waits on the acknowledgement for durability 'remote'. What they share lives here,
once: the acknowledged LSN (persisted in the store and its WAL retention floor with
it), the claim's token and the server's id, and the last error for `walsync status`.

Threads: written by the shipping thread (the replicator's, or the caller's in
``run_once``); ``acked``, ``unacked`` and ``status`` are read from any thread, and
``acked_cv`` is the condition ``wait_acknowledged`` sleeps on.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from walsync.engine.errors import WalsyncError
from walsync.engine.replication import LastError, ReplicationSource
from walsync.engine.worker import SyncWorkerStore

from .incarnation import connect
from .transport import Transport

if TYPE_CHECKING:
    from .replicator import ReplicatorOptions

__all__ = ["Link", "ReplicatorStatus"]

log = logging.getLogger("walsync.replicator")


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


class Link:
    """The claim and the acknowledgement one replicator ships and pulls under."""

    def __init__(self, store: ReplicationSource, transport: Transport,
                 options: ReplicatorOptions) -> None:
        self.store = store
        self.transport = transport
        self.options = options
        self.reader = store.wal_reader()
        #: set by stop(): shipping and retries end at the next batch
        self.stop = threading.Event()
        self.acked_cv = threading.Condition()
        #: (LSN, monotonic commit time) of commits not acknowledged yet: the lag in seconds
        self.unacked: collections.deque[tuple[int, float]] = collections.deque()
        #: the newest LSN a 'remote' commit of this process waits for (wait_acknowledged):
        #: what a pull ships between its pages. A pull ships nothing else, so what a
        #: host pushes, and when (the lease each entry meets), stays its ship's call.
        self.awaited = 0
        #: a sync worker's writer waits in another process (on SYNC), unseen here: every
        #: commit not acknowledged yet may be awaited
        self.awaited_elsewhere = isinstance(store, SyncWorkerStore)
        self.acked = store.sync_ledger.acked_lsn
        if store.retain_floor is None:
            # Held from the first attachment on, and persisted: no checkpoint, compaction
            # or close (here, or in a later open without sync) removes a record the
            # server has not acknowledged, even while the server was never reached.
            store.set_retain_floor(self.acked + 1)
        self.status = ReplicatorStatus(store.node_id, transport.name, acked_lsn=self.acked)
        #: whether the claim was made on this connection (again after start(), or when
        #: a push or pull says the claim is gone)
        self.server_checked = False
        #: the incarnation token this store's node id is claimed with on the server
        self.token: str | None = None
        self.server_id: str | None = None
        #: called when the server's positions stop being the ones the pull cursor
        #: counted (another server, or one that holds less): the puller's reset
        self.on_server_changed: Callable[[], None] = lambda: None

    def ensure_connected(self) -> None:
        """Claim the node id and find where shipping goes on, once per connection
        (again after start(), or when a push or pull says the claim is gone)."""
        if self.server_checked:
            return
        conn = connect(self.store, self.transport, self.reader, self.acked,
                       self.rewind, self.set_acked)
        self.token = conn.token
        self.server_id = conn.server_id
        status = self.status
        status.server_id = conn.server_id
        status.server_head = conn.head
        if conn.renewed is not None:
            status.node_renewals += 1
            status.node_id = self.store.node_id
        if conn.server_changed:
            self.on_server_changed()
        self.server_checked = True

    def rewind(self, lsn: int, why: str) -> None:
        """The server holds less of this store than it acknowledged (another server,
        a database restored from a backup): ship again from ``lsn`` (persisted, the
        WAL's retention floor with it), from the WAL where it still holds the records,
        else the snapshot's versions (the shipper's bootstrap); pull everything again
        too, the server's positions are not the ones the cursor counted."""
        if lsn >= self.acked:
            return
        said = f"{why}; shipping again from LSN {lsn + 1}"
        log.warning("sync: %s", said)
        status = self.status
        status.reships += 1
        status.last_reship = said
        self.acked = lsn
        self.store.sync_ledger.set_acked_lsn(lsn)
        self.store.set_retain_floor(lsn + 1)
        status.acked_lsn = lsn
        self.on_server_changed()

    def still_claimed(self) -> bool:
        """Whether the server still gives this store's node id to this store (and
        holds nothing of it this store did not push)."""
        cur = self.store.identities[-1]
        if self.token is None:
            return False
        h = self.transport.hello(cur.node_id, tokens=[self.token], new_token=None,
                                 acked_lsn=max(self.acked, cur.base_lsn),
                                 base_lsn=cur.base_lsn)
        return h.reason is None and h.server_id == self.server_id

    def set_acked(self, lsn: int) -> None:
        """Move the acknowledgement forward (persisted, with the retention floor) and
        wake the commits waiting for it."""
        moved = lsn > self.acked or self.store.retain_floor != self.acked + 1
        self.acked = max(lsn, self.acked)
        # what a status reading computes lags from, moved together before the slower
        # persisting below
        while self.unacked and self.unacked[0][0] <= self.acked:
            self.unacked.popleft()
        self.status.acked_lsn = self.acked
        if moved:
            self.store.sync_ledger.set_acked_lsn(self.acked)
            self.store.set_retain_floor(self.acked + 1)
        with self.acked_cv:
            self.acked_cv.notify_all()

    def record_error(self, message: str, *, stopped: bool) -> None:
        """Keep the last error in status and in the store, for `walsync status`."""
        self.status.last_error = message
        self.status.last_error_at = time.time()
        with contextlib.suppress(WalsyncError):
            self.store.sync_ledger.set_last_error(
                LastError(message, self.status.last_error_at, stopped))
