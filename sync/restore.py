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
from typing import Any

import cbor2
import xxhash

from walsync.engine import Store
from walsync.engine.errors import RestoreError
from walsync.engine.record import decode_value
from walsync.engine.versions import Sibling
from walsync.engine.workflow import Workflows

from .incarnation import SERVER_ID, hello, verified_through
from .merge import sibling_from_wire
from .remote import Transport, state_page

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
    h = hello(transport, old.node_id, tokens=[], new_token=None, acked_lsn=2**62,
              base_lsn=old.base_lsn)
    raw_server = store.sync_state(SERVER_ID)
    raw_acked = store.sync_state("acked_lsn")
    acked = int.from_bytes(raw_acked, "little") if raw_acked else 0
    same = raw_server is None or raw_server.decode() == h.server_id
    start = max(old.base_lsn, min(acked, h.acked_lsn) if same else old.base_lsn)
    store.flush()
    fork = verified_through(transport, store.wal_reader(), old.node_id, start,
                            min(h.acked_lsn, store.shippable_lsn))
    store.renew_node_id(fork, reason="a forced restore into this store")
    return old.node_id


def _checked(row: dict[str, Any]) -> Sibling:
    sib = sibling_from_wire(row)
    if sib.data is None:
        return sib
    try:
        raw = cbor2.dumps(decode_value(sib.codec, sib.data)) if sib.codec else sib.data
    except Exception as exc:  # noqa: BLE001 - any decode failure is damage
        raise RestoreError(
            f"value of key {row['key']!r} ({row['origin']}:{row['lsn']}) does not decode: {exc}"
        ) from None
    if row.get("value_hash") and xxhash.xxh3_64_hexdigest(raw) != row["value_hash"]:
        raise RestoreError(
            f"checksum mismatch for key {row['key']!r} ({row['origin']}:{row['lsn']}): the "
            "server's bytes do not match the hash written with them"
        )
    return sib


def _runs_of(transport: Transport, node: str, page_keys: int) -> list[str]:
    """Run ids whose index entry was last written by ``node``."""
    runs: list[str] = []
    after: str | None = None
    while True:
        doc = state_page(transport.call("state_page", {"p_prefix": "index/runs/",
                                                       "p_after_key": after,
                                                       "p_limit": page_keys}))
        best: dict[str, tuple[tuple[int, int, str, int], str]] = {}
        for row in doc["rows"]:
            order = (int(row["fence"]), int(row["hlc"]), str(row["origin"]), int(row["lsn"]))
            if row["key"] not in best or order > best[row["key"]][0]:
                best[row["key"]] = (order, str(row["origin"]))
        runs += [k[len("index/runs/"):] for k, (_o, origin) in best.items() if origin == node]
        if doc["done"] or doc["last_key"] is None:
            return runs
        after = doc["last_key"]


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
    if lost_node is not None:
        prefixes = []
        for run_id in _runs_of(transport, lost_node, page_keys):
            prefixes += [f"runs/{run_id}", f"index/runs/{run_id}"]
    else:
        prefixes = [prefix]
    total = sum(int(transport.call("state_count", {"p_prefix": p})["keys"]) for p in prefixes)
    existing = (target / "STORE").exists()
    with Store.open(target, create=True) as store:
        renewed_from = _renew_existing(store, transport) if existing else None
        report = RestoreReport(str(target), store.node_id, lost_node=lost_node, pull_cursor=head,
                               renewed_from=renewed_from)
        for p in prefixes:
            exact_run = p.startswith("runs/") and lost_node is not None
            after: str | None = None
            while True:
                doc = state_page(transport.call("state_page", {"p_prefix": p,
                                                               "p_after_key": after,
                                                               "p_limit": page_keys}))
                rows = [r for r in doc["rows"]
                        if not exact_run or r["key"] == p or r["key"].startswith(p + "/")]
                items = [(r["key"], _checked(r)) for r in rows]
                if items:
                    store.apply_remote(items)
                report.siblings += len(items)
                report.keys += len({k for k, _ in items})
                report.bytes += sum(len(s.data or b"") for _, s in items)
                if progress is not None:
                    progress(report.keys, total)
                if doc["done"] or doc["last_key"] is None:
                    break
                after = doc["last_key"]
        store.apply_remote([], meta={"pull_cursor": head})
        if lost_node is not None:
            status = transport.node_status(lost_node)
            report.lost_node_acked_lsn = status.acked_lsn
            if status.acked_hlc:
                report.recovery_point_unix_ms = status.acked_hlc >> 16
                report.recovery_point = recovery_point_iso(report.recovery_point_unix_ms)
        report.resumable_runs = [r.run_id for r in Workflows(store).resumable()]
    report.seconds = time.perf_counter() - started
    return report
