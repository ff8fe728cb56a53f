"""A store's standing with its sync server: what `walsync status` reports, and `detach`.

Status is asked of a store no sync worker needs to be running for: it reads
what the worker recorded in the store (the acknowledged LSN, the server it was
acknowledged by, the pull cursor, the last error, the entries set aside) and
asks the server, by reads alone, how much of the store it holds. The server's
answer is trusted only as far as the store can check it (``confirmed_position``):
a copy of the store may have shipped under the same node id, and a server put
back from a backup may hold less than it once acknowledged. An unreachable or
unconfigured server is part of the status (``server_error``), never a reason not
to show the local facts.

As a health check (``health``) the status is one verdict, worst first: the
server cannot be reached (or is not configured), it is behind (holds less of
the store than it acknowledged, or is not the server that acknowledged it), or
the oldest write it lacks is older than a limit the caller gives. The sync
ledger drops the worker's last error once a later acknowledgement succeeds, so
an error the worker got past is not reported as current.

Detach ends the store's hold on its WAL for a server that will not be synced
with again; it refuses while the server lacks entries, since once detached a
checkpoint removes them for good.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from walsync.engine import Store
from walsync.engine.errors import SyncError, WalsyncError
from walsync.engine.replication import SyncState
from walsync.engine.versions import HLC_LOGICAL_BITS

from .config import describe_target, transport_from_env
from .incarnation import confirmed_position, count_unreplicated, position
from .restore import recovery_point_iso

__all__ = ["DetachReport", "Health", "ServerView", "SyncStatus", "detach",
           "oldest_unreplicated_age", "sync_status", "unix_ms_of"]


def unix_ms_of(hlc: int) -> int:
    """The wall-clock milliseconds of a hybrid-clock value (its logical counter dropped)."""
    return hlc >> HLC_LOGICAL_BITS


class Health(Enum):
    """The status as one verdict, worst first (`walsync status` exits with it)."""

    OK = "ok"
    #: the server could not be asked: not configured, unreachable, login refused
    UNREACHABLE = "unreachable"
    #: the server holds less than it acknowledged, or is not the server that did
    BEHIND = "behind"
    #: the oldest write the server lacks is older than the caller's limit
    LAGGING = "lagging"


@dataclass(frozen=True)
class ServerView:
    """What the server said of the store (when it could be asked)."""

    server_id: str | None
    #: the server's newest position
    server_head: int
    #: the server holds less of the store than it acknowledged to it (a backup put back)
    server_behind: bool
    #: another server than the one the store's acknowledgement came from
    server_changed: bool
    #: when the newest write the server holds of the store was made (None: none)
    recovery_point_unix_ms: int | None
    recovery_point: str | None
    #: runs whose live lease this store's node holds
    leases_held: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SyncStatus:
    node_id: str
    applied_lsn: int
    retain_floor: int | None
    wal_bytes_held_for_sync: int
    #: the server sync goes to, without secrets
    server: str
    #: what the sync worker recorded in the store
    recorded: SyncState
    #: every local record up to it is on the server (the recorded one if it was not asked)
    acked_lsn: int
    #: local records after what the server holds as the store wrote them (merge
    #: records, pulled from others, do not count: they hold nothing the server lacks)
    unreplicated_entries: int
    oldest_unreplicated_age_seconds: float | None
    #: why the server could not be asked (None: it answered, see ``server_view``)
    server_error: str | None
    server_view: ServerView | None
    #: the way out of ``server_error``
    server_error_hint: str | None = None

    def health(self, max_lag_seconds: float | None = None) -> Health:
        """The worst of: unreachable, behind, lagging beyond ``max_lag_seconds`` (None:
        any lag is healthy). Writes the server lacks whose age the WAL no longer tells
        count as beyond any limit: they cannot be shown to be within it."""
        view = self.server_view
        if view is None:
            return Health.UNREACHABLE
        if view.server_behind or view.server_changed:
            return Health.BEHIND
        if max_lag_seconds is not None and self.unreplicated_entries:
            age = self.oldest_unreplicated_age_seconds
            if age is None or age > max_lag_seconds:
                return Health.LAGGING
        return Health.OK

    def fields(self) -> dict[str, Any]:
        """The status as `walsync status` prints it, in its order (the JSON contract:
        the server's fields only when it answered)."""
        rec = self.recorded
        out: dict[str, Any] = {
            "node_id": self.node_id, "applied_lsn": self.applied_lsn,
            "acked_lsn_local": rec.acked_lsn, "pull_cursor": rec.pull_cursor,
            "retain_floor": self.retain_floor,
            "wal_bytes_held_for_sync": self.wal_bytes_held_for_sync, "server": self.server,
            "server_id_local": rec.server_id,
            "last_error": None if rec.last_error is None else asdict(rec.last_error),
            "unshipped": [asdict(entry) for entry in rec.unshipped],
            "acked_lsn": self.acked_lsn}
        view = self.server_view
        if view is not None:
            out.update(server_id=view.server_id, server_head=view.server_head,
                       server_behind=view.server_behind, server_changed=view.server_changed,
                       recovery_point_unix_ms=view.recovery_point_unix_ms,
                       recovery_point=view.recovery_point, leases_held=view.leases_held)
        out.update(server_error=self.server_error, server_error_hint=self.server_error_hint,
                   unreplicated_entries=self.unreplicated_entries,
                   oldest_unreplicated_age_seconds=self.oldest_unreplicated_age_seconds)
        return out


def sync_status(store: Store, environ: Mapping[str, str] | None = None) -> SyncStatus:
    """The status of ``store`` against the server the environment (or a
    ``WALSYNC_CONFIG`` file) names, as `walsync sync` would reach it. Reads only, on
    the store and on the server; the store may be open read-only beside a writer."""
    info = store.info()
    rec = store.sync_ledger.state()
    server = describe_target(environ)
    confirmed = acked = rec.acked_lsn
    view: ServerView | None = None
    error: str | None = None
    hint: str | None = None
    try:
        transport = transport_from_env(environ)
        try:
            # what the server holds of this store, over every node id it wrote under;
            # the local acknowledgement counts only if it came from this very server
            held = position(transport, store.identities)
            leases = transport.leases(store.node_id)
            confirmed = confirmed_position(store, transport, held)
        finally:
            transport.close()
    except WalsyncError as exc:
        error, hint = str(exc), exc.hint or None
    else:
        acked = held.acked_lsn
        unix_ms = unix_ms_of(held.acked_hlc) or None
        view = ServerView(
            server_id=held.server_id, server_head=held.head,
            server_behind=held.acked_lsn < rec.acked_lsn,
            server_changed=rec.server_id is not None and rec.server_id != held.server_id,
            recovery_point_unix_ms=unix_ms, recovery_point=recovery_point_iso(unix_ms),
            leases_held=[lease.run_id for lease in leases if lease.live])
    return SyncStatus(
        node_id=store.node_id, applied_lsn=info.applied_lsn, retain_floor=info.retain_floor,
        wal_bytes_held_for_sync=info.wal_bytes_held_for_sync, server=server, recorded=rec,
        acked_lsn=acked,
        unreplicated_entries=count_unreplicated(store, confirmed, info.applied_lsn),
        oldest_unreplicated_age_seconds=oldest_unreplicated_age(store, confirmed,
                                                                info.applied_lsn),
        server_error=error, server_view=view, server_error_hint=hint)


def oldest_unreplicated_age(store: Store, acked: int, applied: int) -> float | None:
    """Seconds since the oldest local commit in (acked, applied]: the lag as an age,
    what the recovery point costs if the host is lost now. None when there is none, or
    when the WAL no longer holds it."""
    if applied <= acked:
        return None
    try:
        for rec in store.wal_reader().read(acked, applied, 1000):
            if rec.local:
                return max(0.0, time.time() - unix_ms_of(rec.hlc) / 1000)
    except WalsyncError:
        return None
    return None


@dataclass(frozen=True)
class DetachReport:
    #: the retention floor dropped (None: the store held no WAL for sync)
    retain_floor: int | None
    #: entries the server had not acknowledged, which checkpoints may now remove
    unreplicated_entries: int


def detach(store: Store, *, force: bool = False) -> DetachReport:
    """Drop the store's WAL retention floor for sync, for a store that stops syncing
    for good (its WAL would otherwise grow forever). Refused (SyncError) while the
    server has not acknowledged every entry, unless ``force``: their history is then
    given up, and a later sync ships the snapshot's versions of what the WAL lost."""
    floor = store.retain_floor
    acked = store.sync_ledger.acked_lsn
    unreplicated = max(0, store.applied_lsn - acked) if floor is not None else 0
    if unreplicated and not force:
        raise SyncError(f"the server has not acknowledged {unreplicated} entries of "
                        f"{store.path} (LSN {acked + 1}..{store.applied_lsn}); once detached, "
                        "checkpoints remove them from the WAL",
                        hint="ship them first (`walsync sync --once`), or pass --force to "
                             "give their history up")
    store.set_retain_floor(None)
    return DetachReport(floor, unreplicated)
