"""Shipping: committed WAL records to the server, in LSN order, acknowledged as confirmed.

Records after the acknowledged LSN, in LSN order, batched by count, bytes and
time; only records that are both durable and applied locally, so the server
never holds an LSN this node could lose and hand out again. A batch holds one
node id's LSNs (engine/identity.py) and is acknowledged only as far as the
server confirmed it. Entries the server cannot hold are set aside and listed
(PROTOCOL.md), never stopping the records after them; writes the server refused
under another host's lease are reported once per lease. Records whose WAL is
gone (removed before sync was attached, or a server behind) are shipped from
the snapshot's versions (``bootstrap``).

Threads: the shipping thread (the replicator's, or the caller's in ``run_once``).
While a full batch is pushed, a short-lived thread reads and encodes the next one
(pushes themselves stay one at a time, on the shipping thread).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from walsync.engine import Store
from walsync.engine.errors import (
    CorruptionError,
    LeaseLostError,
    LSNGapError,
    RemoteUnavailableError,
    WalsyncError,
)
from walsync.engine.events import LeaseLostEvent
from walsync.engine.identity import NodeIdentity, end_of, owner_of, translate_vv
from walsync.engine.metrics import LATENCY_BOUNDS_NS, Histogram
from walsync.engine.replication import UnshippedEntry
from walsync.engine.workflow import drop_lease
from walsync.engine.workflow import keys as run_keys

from .link import Link
from .merge import record_to_wire, sibling_to_wire
from .transport import Claim, FencedRun, PushAck, WireBatch

__all__ = ["MAX_RECLAIMS", "Shipper"]

log = logging.getLogger("walsync.replicator")

#: how many entries set aside, never shipped, the store lists (the latest ones); see
#: PROTOCOL.md and SyncLedger.unshipped
_UNSHIPPED_KEPT = 100
#: fencing tokens are bigints on the server
_FENCE_LIMIT = 1 << 63
#: claims one ship or pull may go through (each answers a server that changed under it)
MAX_RECLAIMS = 4


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


class _Reclaim(Exception):
    """A push found the store's claim on its node id gone (or another server)."""


class Shipper:
    """Pushes a store's records under its link's claim; counts what it pushed."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self.store = link.store
        self.transport = link.transport
        self.options = link.options
        #: told (from the shipping thread) when a run is fenced
        self.lost_callbacks: list[Callable[[LeaseLostError], None]] = []
        #: written by the shipping thread only; read by the replicator's stats()
        self.push_ns = Histogram(LATENCY_BOUNDS_NS, divisor=1e9)
        self.pushed_bytes = 0
        self.fenced_writes = 0

    def ship(self) -> int:
        """Push every durable, applied record after the acknowledged LSN.

        Batches go out one at a time, in LSN order, each acknowledged only once the
        server confirmed it. While one is in flight the next is read and encoded on a
        short-lived thread (``_Ahead``): the server's work and the client's overlap.
        """
        store = self.store
        link = self._link
        link.ensure_connected()
        if store.shippable_lsn < store.applied_lsn:
            store.flush()
        total = 0
        reclaims = 0
        ahead: _Ahead | None = None
        try:
            while not link.stop.is_set():
                try:
                    try:
                        if ahead is not None:
                            pending, ahead = ahead, None
                            batch = pending.result()
                        else:
                            batch = self._build(link.acked, store.shippable_lsn)
                    except LSNGapError:
                        total += self.bootstrap()
                        continue
                    if batch.through_lsn <= link.acked:
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
                    if reclaims > MAX_RECLAIMS:
                        raise RemoteUnavailableError(
                            f"pushing from {store.path}: {exc}; claimed node id "
                            f"{store.node_id} {reclaims - 1} times in one round") from None
                    link.server_checked = False
                    link.ensure_connected()
                    continue
                if ahead is not None and link.acked != batch.through_lsn:
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
        reader = self._link.reader
        entries = WireBatch()
        through = after_lsn
        count = size = read_bytes = 0
        chain = self.store.identities
        owner = owner_of(chain, after_lsn + 1)
        end = end_of(chain, owner)
        if end is not None:  # a batch is one node id's: it ends where the next id starts
            upto_lsn = min(upto_lsn, end)
        while count < opts.batch_records and read_bytes < opts.batch_bytes:
            records = reader.read(through, upto_lsn,
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
        self._link.record_error(message, stopped=False)
        with contextlib.suppress(WalsyncError, ValueError):
            ledger = self.store.sync_ledger
            listed = ledger.unshipped
            item = UnshippedEntry(lsn, key, reason)
            if item not in listed:  # a batch read again after a failed push
                ledger.set_unshipped([*listed, item][-_UNSHIPPED_KEPT:])

    def _push_batch(self, batch: _Batch) -> int:
        """Push one batch and acknowledge it as far as the server confirmed: the count."""
        link = self._link
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
            link.set_acked(batch.through_lsn)
            return 0
        self.push_ns.observe(time.perf_counter_ns() - started)
        if ack.fenced:
            self.fenced_writes += len(ack.fenced)
            self._report_fenced(ack.fenced, entries)
        link.status.pushed_entries += len(entries)
        self.pushed_bytes += batch.size_bytes
        link.status.last_push_at = time.time()
        link.status.server_head = ack.head
        # what this push confirmed, never more: a server ahead of the batch holds
        # entries this store did not send (ignored as duplicates of its own LSNs)
        link.set_acked(batch.through_lsn)
        return len(entries)

    def _send(self, owner: NodeIdentity, through_lsn: int,
              entries: list[dict[str, Any]]) -> PushAck | None:
        """Push under the store's claim of ``owner`` (or, for an id the store retired,
        as re-shipping what the server held of it), following the acknowledged LSN.
        None: the server holds less than that (rewound). Raises _Reclaim when the
        claim no longer holds or the server is another one."""
        link = self._link
        current = owner.node_id == self.store.node_id
        batch = entries if isinstance(entries, WireBatch) else WireBatch(entries)
        batch.claim = Claim(link.token if current else None, owner.base_lsn, link.acked)
        ack = self.transport.push(owner.node_id, through_lsn, batch)
        if ack.server_id is not None and ack.server_id != link.server_id:
            raise _Reclaim(f"the server is another one now (id {ack.server_id})")
        if ack.refused == "taken":
            raise _Reclaim(f"another store holds node id {owner.node_id} on the server now")
        if ack.refused == "behind":
            link.rewind(ack.acked_lsn, f"server {link.server_id} holds LSNs of node "
                                       f"{owner.node_id} only up to {ack.acked_lsn}, this "
                                       f"store had {link.acked} acknowledged")
            return None
        return ack

    def _report_fenced(self, fenced: list[FencedRun], entries: list[dict[str, Any]]) -> None:
        """The server refused this node's writes to runs whose lease it does not hold
        (``entries``: the pushed batch, which says what token those writes carried)."""
        status = self._link.status
        for item in fenced:
            run_id, current, holder = item.run_id, item.current, item.holder
            if status.lost_runs.get(run_id) == current:
                continue  # told already, for this lease
            if holder == self.store.node_id:
                # This node holds the run's lease: what was refused are its own
                # writes from before it took the lease (e.g. the run's creation)
                # or written without the token. The run was not taken over.
                if status.stale_refused.get(run_id) != current:
                    status.stale_refused[run_id] = current
                    log.warning("sync: run %s: writes this host made before taking its lease "
                                "(token %d) or without the token were refused by the server",
                                run_id, current)
                continue
            status.lost_runs[run_id] = current
            status.fenced_runs += 1
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
            for callback in self.lost_callbacks:
                try:
                    callback(LeaseLostError(said, run_id=run_id, current_token=current,
                                            holder=holder))
                except Exception:
                    log.exception("lease-lost callback failed")

    def bootstrap(self) -> int:
        """Ship state whose WAL records are gone: removed before sync was attached, or
        before the server lost them (a server behind, another server).

        The store's own versions of those LSNs still in the snapshot (not superseded)
        are shipped as they are (their history is gone), one node id's LSNs at a
        time, then the acknowledgement jumps to just below the oldest record the WAL
        still holds (or the id's last LSN), and shipping goes on from the log.
        """
        store = self.store
        link = self._link
        oldest = link.reader.oldest_lsn()
        first_available = oldest if oldest is not None else store.shippable_lsn + 1
        if first_available <= link.acked + 1:
            raise LSNGapError(f"the WAL of {store.path} has a hole after LSN {link.acked}")
        chain = store.identities
        owner = owner_of(chain, link.acked + 1)
        end = end_of(chain, owner)
        upto = first_available - 1 if end is None else min(first_available - 1, end)
        after = link.acked
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
        link.status.pushed_entries += total
        link.set_acked(upto)
        return total


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
