"""What a commit becomes before it is written: its LSN, its HLC, its versions, and
the bytes of its WAL record.

Assignment runs under the commit pipeline's lock (engine/commit.py), so LSNs
are given in the order records reach the WAL. A key's current siblings are
those of the last record assigned to it: the snapshot's entry, or, while a
record is on its way to the snapshot, the *overlay* of records assigned and not
yet applied (the pipeline drops them from it as their batch is applied).
Three kinds of record are made here: a local commit (``local``), a merge of
versions pulled from other nodes (``merge``), and the relabelling of a node-id
renewal (``renewal``, engine/identity.py).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import cbor2

from .errors import CapacityError, WalsyncError
from .identity import NodeIdentity, chain_to_json, relabel_version
from .ops import ANY, Delete, Put, check_expect
from .reads import siblings_of
from .record import (
    KIND_LOCAL,
    KIND_MERGE,
    MAX_PAYLOAD_BYTES,
    encode_entry,
    encode_entry_parts,
    encode_payload,
    encode_payload_parts,
)
from .snapshot import SnapshotStore
from .storefile import IDENTITIES
from .versions import HybridClock, Sibling, Version, join_vv, merge_sibling

if TYPE_CHECKING:
    from .events import Event

__all__ = ["Assigner", "Pending"]


class Pending:
    """A record on its way through the pipeline, and the thread waiting for it."""

    __slots__ = (
        "done", "error", "hlc", "kind", "lsn", "notes", "on_done", "ops", "payload", "sync",
        "waiter", "written",
    )

    def __init__(self, lsn: int, hlc: int, ops: Sequence[Sequence[Any]],
                 payload: bytes | list[bytes], sync: bool, kind: int = KIND_LOCAL):
        self.kind = kind
        self.lsn = lsn
        self.hlc = hlc
        self.ops = ops
        self.payload = payload
        self.sync = sync
        #: the WAL stage is over for this record (written, and synced if asked)
        self.written = False
        self.done = False
        self.error: WalsyncError | None = None
        #: the committing thread sleeps on this (made when it first has to wait),
        #: so that each wake-up goes to the one thread it concerns
        self.waiter: threading.Condition | None = None
        #: events this commit carries (store.events publishes them after its CommitEvent)
        self.notes: tuple[Event, ...] = ()
        #: an awaited commit's completion (engine/aio.py): no thread waits for the
        #: record, the pipeline's driver thread leads for it and calls this when done
        self.on_done: Callable[[int, WalsyncError | None], None] | None = None


class Assigner:
    """The next LSN, the clock, the node identities, and the overlay. Every method
    runs under the pipeline's lock."""

    def __init__(self, snapshot: SnapshotStore, identities: tuple[NodeIdentity, ...],
                 next_lsn: int = 1, clock: HybridClock | None = None) -> None:
        self._snapshot = snapshot
        self.next_lsn = next_lsn
        self.clock = clock or HybridClock()
        #: every node id this store wrote under (engine/identity.py); the last is node_id
        self.identities = identities
        self.node_id = identities[-1].node_id
        #: key -> (LSN, siblings) of records assigned and not yet applied
        self.overlay: dict[str, tuple[int, list[Sibling]]] = {}

    def local(
        self,
        ops: Sequence[Put | Delete],
        prepared: list[tuple[int, bytes | None]],
        sync: bool,
    ) -> Pending:
        """Check expectations, give the record its LSN and versions."""
        lsn = self.next_lsn
        hlc = self.clock.tick()
        node = self.node_id
        # a large value stays one buffer, shared by the entry and the payload
        # (given in parts) until the apply stage joins the entry for LMDB
        wire_ops: list[tuple[str, bytes | list[bytes]]] = []
        new: dict[str, list[Sibling]] = {}
        with self._snapshot.read_applied() as txn:
            for op, (codec, data) in zip(ops, prepared, strict=True):
                key = op.key
                current = new.get(key)
                if current is None:
                    current = self.current_siblings(txn, key)
                if op.expect is not ANY:
                    check_expect(key, op.expect, current)
                vv = join_vv(s.version.vv for s in current)
                vv[node] = lsn
                sib = Sibling(Version(node, lsn, hlc, vv, op.fence, data is None), codec, data)
                new[key] = [sib]
                wire_ops.append((key, encode_entry_parts([sib])))
        payload = encode_payload_parts(KIND_LOCAL, hlc, wire_ops)
        size = len(payload) if isinstance(payload, bytes) else sum(len(p) for p in payload)
        if size > MAX_PAYLOAD_BYTES:
            raise CapacityError(
                f"a commit of {len(ops)} operations encodes to {size} bytes, above the "
                f"{MAX_PAYLOAD_BYTES} bytes one record may hold; nothing was written",
                hint="split the batch into several commits",
            )
        self.next_lsn = lsn + 1
        for key, sibs in new.items():
            self.overlay[key] = (lsn, sibs)
        return Pending(lsn, hlc, wire_ops, payload, sync)

    def merge(
        self, items: Sequence[tuple[str, Sibling]], meta: dict[str, Any] | None
    ) -> Pending | None:
        """A merge record of versions from other nodes (None: nothing to write).
        Never shipped back; ``meta`` is set by the same record (a meta op)."""
        for _key, sib in items:
            self.clock.observe(sib.version.hlc)
        new: dict[str, list[Sibling]] = {}
        with self._snapshot.read_applied() as txn:
            for key, sib in items:
                current = new.get(key)
                if current is None:
                    current = self.current_siblings(txn, key)
                merged = merge_sibling(current, sib)
                if merged is not None:
                    new[key] = merged
        ops: list[list[Any]] = [[key, encode_entry(sibs)] for key, sibs in new.items()]
        if meta:
            ops.append(["", cbor2.dumps(meta)])
        if not ops:
            return None
        lsn = self.next_lsn
        hlc = self.clock.tick()
        payload = encode_payload(KIND_MERGE, hlc, ops)
        if len(payload) > MAX_PAYLOAD_BYTES:
            # refused here, before the WAL: a frame the writer rejects poisons the store
            raise CapacityError(
                f"a merge of {len(new)} keys encodes to {len(payload)} bytes, above the "
                f"{MAX_PAYLOAD_BYTES} bytes one record may hold; nothing was written",
                hint="merge fewer versions per call",
            )
        self.next_lsn = lsn + 1
        for key, sibs in new.items():
            self.overlay[key] = (lsn, sibs)
        return Pending(lsn, hlc, ops, payload, True, KIND_MERGE)

    def renewal(self, fork_lsn: int, reason: str, path: str) -> tuple[Pending, NodeIdentity]:
        """The relabelling record of a node-id renewal, and the switch to the new id:
        commits assigned before it wrote under the old id (their versions are in the
        overlay, relabelled here too), those after it under the new one. Scans the
        whole snapshot (a rare event)."""
        old = self.node_id
        lsn = self.next_lsn
        first = self.identities[0].node_id
        ident = NodeIdentity(f"{first[:47]}.{secrets.token_hex(8)}", fork_lsn + 1, lsn, reason)
        chain = (*self.identities, ident)
        ops: list[list[Any]] = []
        snapshot = self._snapshot
        with snapshot.read_applied() as txn:
            keys = [k.decode() for k, _ in snapshot.iter_range(txn, b"", None, False)]
            for key in sorted(set(keys) | set(self.overlay)):
                sibs = self.current_siblings(txn, key)
                relabelled = [Sibling(relabel_version(s.version, old, ident), s.codec, s.data)
                              for s in sibs]
                if any(a.version is not b.version for a, b in zip(sibs, relabelled,
                                                                  strict=True)):
                    relabelled.sort(key=lambda s: s.version.order_key)
                    ops.append([key, encode_entry(relabelled)])
                    self.overlay[key] = (lsn, relabelled)
        ops.append(["", cbor2.dumps({IDENTITIES: chain_to_json(chain)})])
        hlc = self.clock.tick()
        payload = encode_payload(KIND_MERGE, hlc, ops)
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise CapacityError(
                f"renewing the node id of {path} relabels {len(ops) - 1} keys, "
                f"{len(payload)} bytes, above the {MAX_PAYLOAD_BYTES} bytes one record may hold",
                hint="ship the store's backlog under its old id first (`walsync sync --once`)")
        self.next_lsn = lsn + 1
        self.identities = chain
        self.node_id = ident.node_id
        return Pending(lsn, hlc, ops, payload, True, KIND_MERGE), ident

    def current_siblings(self, txn: Any, key: str) -> list[Sibling]:
        pending = self.overlay.get(key)
        if pending is not None:
            return pending[1]
        raw_key = key.encode()
        raw = self._snapshot.entry_in(txn, raw_key)
        return siblings_of(self._snapshot, raw_key, raw) if raw is not None else []
