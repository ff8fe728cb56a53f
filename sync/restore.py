"""Restore after host loss: build a new store from the server's merged state.

The new store gets a new node id (a lost host's LSNs are never reused: see
the kv679 lesson in SPEC 4.5). A forced restore into an existing store gives
that store a fresh node id too: the directory may be a stale copy of a store
that lives on elsewhere (the lost host's old disk, say), and its writes from
now on must not share an id with that one's. Every sibling is checked against
its value hash before it is written, and the pull cursor is set to the
server's head as read *before* the state was paged, so anything committed
during the restore is pulled afterwards (merging twice changes nothing).
Restored runs need their leases before they resume.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cbor2
import xxhash

from walsync.engine import Store
from walsync.engine.errors import RestoreError
from walsync.engine.record import decode_value
from walsync.engine.versions import Sibling
from walsync.engine.workflow import Workflows
from walsync.engine.workflow import keys as run_keys

from .incarnation import verified_through
from .transport import StateRow, Transport

__all__ = ["RestoreReport", "recovery_point_iso", "restore"]

log = logging.getLogger("walsync.restore")


@dataclass
class RestoreReport:
    path: str
    node_id: str
    keys: int = 0
    siblings: int = 0
    bytes: int = 0
    pull_cursor: int = 0
    lost_node: str | None = None
    #: the lost node's last acknowledged LSN and its commit time: the recovery point,
    #: as ISO-8601 UTC and as unix milliseconds (the names `walsync status` uses)
    lost_node_acked_lsn: int | None = None
    recovery_point: str | None = None
    recovery_point_unix_ms: int | None = None
    #: the node id the store had before a forced restore into it (it took a fresh one)
    renewed_from: str | None = None
    resumable_runs: list[str] = field(default_factory=list)
    seconds: float = 0.0


def recovery_point_iso(unix_ms: int | None) -> str | None:
    """The recovery point's time as ISO-8601 UTC (millisecond precision)."""
    if not unix_ms:
        return None
    return dt.datetime.fromtimestamp(unix_ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


def _renew_existing(store: Store, transport: Transport) -> str:
    """A forced restore into an existing store: a fresh node id for everything the
    server does not hold as this store wrote it (its old id may live on in another
    copy of the directory). Returns the old id."""
    old = store.identities[-1]
    h = transport.hello(old.node_id, tokens=[], new_token=None, acked_lsn=2**62,
                        base_lsn=old.base_lsn)
    acked = store.sync_ledger.acked_lsn
    local_server = store.sync_ledger.server_id
    same = local_server is None or local_server == h.server_id
    start = max(old.base_lsn, min(acked, h.acked_lsn) if same else old.base_lsn)
    store.flush()
    fork = verified_through(transport, store.wal_reader(), old.node_id, start,
                            min(h.acked_lsn, store.shippable_lsn))
    store.renew_node_id(fork, reason="a forced restore into this store")
    return old.node_id


def _checked(row: StateRow) -> Sibling:
    sib = row.sibling
    if sib.data is None:
        return sib
    where = f"key {row.key!r} ({sib.version.origin}:{sib.version.lsn})"
    try:
        raw = cbor2.dumps(decode_value(sib.codec, sib.data)) if sib.codec else sib.data
    except Exception as exc:  # noqa: BLE001 - any decode failure is damage
        raise RestoreError(f"value of {where} does not decode: {exc}") from None
    if row.value_hash and xxhash.xxh3_64_hexdigest(raw) != row.value_hash:
        raise RestoreError(
            f"checksum mismatch for {where}: the server's bytes do not match the hash "
            "written with them"
        )
    return sib


def _runs_of(transport: Transport, node: str, page_keys: int) -> list[str]:
    """The record and index keys of each run whose index entry was last written by
    ``node``, in the spelling it was written in (a host of an older walsync wrote
    the legacy one: engine/workflow/keys.py)."""
    found: list[str] = []
    for grammar in (run_keys.CURRENT, run_keys.LEGACY):
        after: str | None = None
        while True:
            page = transport.state_page(grammar.INDEX, after, page_keys)
            best: dict[str, tuple[tuple[int, int, str, int], str]] = {}
            for row in page.rows:
                order = row.sibling.version.order_key
                if row.key not in best or order > best[row.key][0]:
                    best[row.key] = (order, row.sibling.version.origin)
            for key, (_order, origin) in best.items():
                run_id = key[len(grammar.INDEX):]
                if origin == node and run_id and "/" not in run_id:
                    found += [grammar.run(run_id), grammar.index(run_id)]
            if page.done or page.last_key is None:
                break
            after = page.last_key
    return found


def restore(
    transport: Transport,
    dest: str | os.PathLike[str],
    *,
    prefix: str = "",
    lost_node: str | None = None,
    force: bool = False,
    page_keys: int = 1000,
    progress: Callable[[int, int], None] | None = None,
) -> RestoreReport:
    """Rebuild a store at ``dest``: all keys, those under ``prefix``, or a lost node's runs."""
    started = time.perf_counter()
    target = Path(dest)
    if target.exists() and any(target.iterdir()) and not force:
        raise RestoreError(f"{target} is not empty: restore builds a new store")
    head = transport.head()
    # a lost node's runs: each run's key and everything under it (exact_run below:
    # not another run whose id begins with this one's)
    prefixes = _runs_of(transport, lost_node, page_keys) if lost_node is not None else [prefix]
    total = sum(transport.state_count(p).keys for p in prefixes)
    existing = (target / "STORE").exists()
    with Store.open(target, create=True) as store:
        renewed_from = _renew_existing(store, transport) if existing else None
        report = RestoreReport(str(target), store.node_id, lost_node=lost_node, pull_cursor=head,
                               renewed_from=renewed_from)
        for p in prefixes:
            exact_run = lost_node is not None
            after: str | None = None
            while True:
                page = transport.state_page(p, after, page_keys)
                rows = [r for r in page.rows
                        if not exact_run or r.key == p or r.key.startswith(p + "/")]
                items = [(r.key, _checked(r)) for r in rows]
                if items:
                    store.apply_remote(items)
                report.siblings += len(items)
                report.keys += len({k for k, _ in items})
                report.bytes += sum(len(s.data or b"") for _, s in items)
                if progress is not None:
                    progress(report.keys, total)
                if page.done or page.last_key is None:
                    break
                after = page.last_key
        store.apply_remote([], pull_cursor=head)
        if lost_node is not None:
            status = transport.node_status(lost_node)
            report.lost_node_acked_lsn = status.acked_lsn
            if status.acked_hlc:
                report.recovery_point_unix_ms = status.acked_hlc >> 16
                report.recovery_point = recovery_point_iso(report.recovery_point_unix_ms)
        report.resumable_runs = [r.run_id for r in Workflows(store).resumable()]
    report.seconds = time.perf_counter() - started
    return report
