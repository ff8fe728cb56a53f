"""Node incarnations on a server: which store may push under a node id, and how much
of a store the server holds.

A store's node id must name one incarnation (PROTOCOL.md, Node identity; engine/identity.py). A
``cp -r`` of a store, a disk image put back, a restore over an old directory all
hold the same id and the same history up to a point, then write different
records under the same LSNs. The server would keep the first and skip the other
as a duplicate of (origin, LSN, key): a write acknowledged, never stored. So:

* Before it ships, a replicator *claims* its id (``walsync_api.hello``): with a
  fresh random token, remembered in the store (fsynced) before the server sees
  it, granted only if the server's token for the id is one of the store's own
  and the server holds nothing of the id past the store's acknowledgement. A copy
  made before the original's last claim shows an old token; a copy whose original
  shipped past the copy's position is "ahead": both are refused.
* Every push names the token (``push_claimed``); a push under another is refused,
  so two incarnations never ship under one id, whoever claimed first.
* A refused store checks the server's entries above its acknowledgement against
  its own records (``verified_through``: key, stored bytes, HLC per LSN). If they
  are its own (its acknowledgement was lost in a crash) it adopts them; otherwise
  it takes a fresh id for everything above the last matching LSN
  (``Store.renew_node_id``), and ships that under the new id.
* The server's id (``walsync.server``) is kept beside the acknowledged LSN: on
  another server the store ships everything again, and on a server that holds
  less than the store's acknowledgement (a restored backup) it ships again from
  what the server holds (``position``). Pushes follow the server's position
  (``push_claimed`` refuses one after a gap), so an acknowledgement never covers
  entries the server lacks.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from walsync.engine.errors import CorruptionError, LSNGapError, RemoteUnavailableError
from walsync.engine.feed import WALReader
from walsync.engine.identity import NodeIdentity, end_of
from walsync.engine.replication import ReplicationSource

from .merge import record_to_wire
from .nodes import announce
from .transport import Hello, Transport

__all__ = ["Connection", "Hello", "ServerPosition", "confirmed_position", "connect",
           "count_unreplicated", "position", "server_entries", "verified_through"]

log = logging.getLogger("walsync.replicator")

#: LSNs per node_entries call
_ENTRIES_PAGE = 1000
#: fencing tokens are bigints on the server (an entry outside is never shipped)
_FENCE_LIMIT = 1 << 63
#: claims a connect may go through before it gives up for now (each one answers a
#: server that changed under it: a claim, an adoption, a renewal)
_MAX_ROUNDS = 8


#: an entry as both sides can compare it: key, md5 of the stored bytes (None: a
#: tombstone), HLC (None: the server kept it among refused writes, without one)
_Print = tuple[str, str | None, int | None]


def server_entries(transport: Transport, node_id: str, after: int,
                   upto: int) -> dict[int, list[_Print]]:
    """What the server holds of ``node_id``'s LSNs in (after, upto], by LSN."""
    out: dict[int, list[_Print]] = {}
    lo = after
    while lo < upto:
        hi = min(upto, lo + _ENTRIES_PAGE)
        for row in transport.node_entries(node_id, lo, hi):
            out.setdefault(row.lsn, []).append((row.key, row.md5, row.hlc))
        lo = hi
    return out


def _matches(server: list[_Print], local: list[_Print]) -> bool:
    if len(server) != len(local):
        return False
    mine = {key: (md5, hlc) for key, md5, hlc in local}
    for key, md5, hlc in server:
        found = mine.get(key)
        if found is None or found[0] != md5 or (hlc is not None and found[1] != hlc):
            return False
    return True


def _prints(lsn: int, ops: Any) -> list[_Print]:
    """What the server holds of a local record once shipped: its entries, but for those
    the replicator sets aside (a value that does not decode, a fence outside a bigint,
    a key with NUL: never shipped)."""
    try:
        wire = record_to_wire(lsn, ops)
    except CorruptionError:
        wire = []
        last = {key: entry for key, entry in ops if key}
        for key, entry in last.items():
            with contextlib.suppress(CorruptionError):
                wire += record_to_wire(lsn, [[key, entry]])
    return [(e["key"], None if e["data"] is None else hashlib.md5(e["data"]).hexdigest(),
             int(e["hlc"])) for e in wire
            if "\x00" not in e["key"] and 0 <= int(e["fence"]) < _FENCE_LIMIT]


def verified_through(transport: Transport, reader: WALReader, node_id: str, after: int,
                     upto: int) -> int:
    """The last LSN ``v`` in [after, upto] such that for every LSN in (after, v] the
    server holds of ``node_id`` exactly what this store's record there wrote (nothing
    for a merge record). Records the WAL no longer holds cannot be checked: it stops
    before them."""
    if upto <= after:
        return after
    held = server_entries(transport, node_id, after, upto)
    verified = after
    while verified < upto:
        try:
            records = reader.read(verified, upto, 1000)
        except LSNGapError:
            return verified
        if not records:
            return verified
        for rec in records:
            if rec.lsn != verified + 1:
                return verified
            local = _prints(rec.lsn, rec.ops) if rec.local else []
            if not _matches(held.get(rec.lsn, []), local):
                return verified
            verified = rec.lsn
    return verified


@dataclass(frozen=True)
class ServerPosition:
    """How much of a store a server holds, over every node id the store wrote under."""

    server_id: str | None
    #: every record of the store up to this LSN is on the server
    acked_lsn: int
    #: the newest acknowledged write's HLC (the recovery point's time; 0: none)
    acked_hlc: int
    head: int
    #: per node id: what the server holds of it (its own LSN position)
    nodes: dict[str, int] = field(default_factory=dict)


def position(transport: Transport, chain: Sequence[NodeIdentity]) -> ServerPosition:
    """What the server holds of a store, asking nothing of it but reads: each id in
    turn, as far as the server holds its LSNs without a gap."""
    pos = 0
    hlc = head = 0
    server_id: str | None = None
    nodes: dict[str, int] = {}
    for ident in chain:
        base = ident.base_lsn if pos >= ident.base_lsn else 0
        h = transport.hello(ident.node_id, tokens=[], new_token=None, acked_lsn=2**62,
                            base_lsn=base)
        server_id, head = h.server_id, h.head
        nodes[ident.node_id] = h.acked_lsn
        if pos < ident.base_lsn:
            break  # a gap before this id: nothing of it counts
        hlc = max(hlc, h.acked_hlc)
        end = end_of(chain, ident)
        if end is not None and h.acked_lsn >= end:
            pos = end
            continue
        pos = max(pos, h.acked_lsn if end is None else min(h.acked_lsn, end))
        break
    return ServerPosition(server_id, pos, hlc, head, nodes)


@dataclass
class Connection:
    """What a connect found: the server, the claim, and where shipping goes on."""

    server_id: str
    #: the token the current node id is claimed with
    token: str
    acked_lsn: int
    head: int
    #: the store was acknowledged by another server before (it ships everything again)
    server_changed: bool = False
    #: the server held less than the store's acknowledgement (it ships again from there)
    server_behind: bool = False
    #: the node id the store took because another store holds its old one
    renewed: NodeIdentity | None = None


def connect(store: ReplicationSource, transport: Transport, reader: WALReader, acked: int,
            rewind: Callable[[int, str], None], advance: Callable[[int], None]) -> Connection:
    """Claim the store's node id on the server and find where shipping goes on.

    ``acked`` is the store's acknowledged LSN; ``rewind(lsn, why)`` moves it back
    (persisted) when the server holds less, ``advance(lsn)`` forward over entries
    the server was found to hold as this store wrote them. Renews the node id when
    another store holds it. Before this returns nothing was shipped or pulled.
    """
    changed = behind = False
    renewed: NodeIdentity | None = None
    copied = store.copied_from
    if copied is not None:
        # a copy of the directory (cp -r, a file backup put back): whatever the server
        # says, its original may live on under the same id; what both share for sure is
        # what a server acknowledged before the copy
        cur = store.identities[-1]
        fork = max(cur.base_lsn, min(acked, store.shippable_lsn))
        why = (f"the store directory {store.path} is a copy (the store was made in "
               f"directory inode {copied})")
        renewed = store.renew_node_id(fork, reason=why)
        log.warning("sync: %s; it ships LSNs after %d as node %s", why, fork, renewed.node_id)
    else:
        store.record_directory()
    #: (node id, LSN): what the server was found to hold of the current id as this
    #: store wrote it, past ``acked`` while LSNs of earlier ids are still to ship
    known = ("", 0)
    for _ in range(_MAX_ROUNDS):
        chain = store.identities
        cur = chain[-1]
        local_server = store.sync_ledger.server_id
        token = secrets.token_hex(16)
        store.add_incarnation_token(token)  # before the server knows it
        mine = max(acked, cur.base_lsn, known[1] if known[0] == cur.node_id else 0)
        h = transport.hello(cur.node_id, tokens=store.incarnation_tokens(), new_token=token,
                            acked_lsn=mine, base_lsn=cur.base_lsn)
        if local_server != h.server_id:
            # (a store that synced before servers had ids takes this one as its own:
            # what it holds of the store is checked below like any server's)
            if local_server is not None:
                # another server: it holds what it acknowledged when the store last
                # synced with it (checked below like any server's position), else nothing
                positions = store.sync_ledger.server_positions
                positions[local_server] = acked
                back = positions.pop(h.server_id, 0)
                store.sync_ledger.set_server_positions(positions)
                if back < acked or known[1]:
                    rewind(back, f"the server is another one (id {h.server_id}, this "
                                 f"store's acknowledgement came from {local_server})")
                elif back > acked:
                    advance(back)
                acked, known = back, ("", 0)
                changed = True
            store.sync_ledger.set_server_id(h.server_id)
            if mine != max(acked, cur.base_lsn):
                continue  # claim again with what this store holds on this server
        if len(chain) > 1:
            held = min(position(transport, chain[:-1]).acked_lsn, cur.base_lsn)
            if held < min(acked, cur.base_lsn):
                rewind(held, f"server {h.server_id} holds LSNs of this store's earlier node "
                             f"ids only up to {held}")
                acked, behind = held, True
            elif acked < held:
                acked = held  # what the server holds of retired ids, shared with any copy
                advance(held)
        if h.reason is not None:
            upto = min(h.acked_lsn, store.shippable_lsn)
            verified = verified_through(transport, reader, cur.node_id,
                                        _check_from(reader, cur, mine), upto)
            if h.reason == "ahead" and verified == h.acked_lsn:
                # its own entries, whose acknowledgement this store lost (a crash)
                known = (cur.node_id, verified)
                if acked >= cur.base_lsn:
                    acked = verified
                    advance(verified)
                continue
            why = ("another store (a copy of this one) holds it on the server"
                   if h.reason == "taken" else
                   f"the server holds entries of it up to LSN {h.acked_lsn}, this store's "
                   f"own differ after LSN {verified} (a copy of this store wrote them)")
            renewed = store.renew_node_id(verified, reason=f"node id {cur.node_id}: {why}")
            log.warning("sync: node id %s of %s is not this store's alone: %s; it ships "
                        "LSNs after %d as node %s", cur.node_id, store.path, why, verified,
                        renewed.node_id)
            if acked >= cur.base_lsn and verified > acked:
                acked = verified
                advance(verified)
            elif verified < acked:  # the server lost what it acknowledged, then took another's
                rewind(verified, f"server {h.server_id} holds other writes than this store's "
                                 f"under node id {cur.node_id} after LSN {verified}")
                acked, behind = verified, True
            continue
        if h.acked_lsn < mine and acked > h.acked_lsn:
            rewind(h.acked_lsn, f"server {h.server_id} holds LSNs of node {cur.node_id} only "
                                f"up to {h.acked_lsn}, this store had {acked} acknowledged "
                                "(a database restored from a backup?)")
            acked, behind = h.acked_lsn, True
        # a name for people (`walsync nodes`): this host's, unless a person gave one
        announce(transport, cur.node_id)
        return Connection(h.server_id, token, acked, h.head, changed, behind, renewed)
    raise RemoteUnavailableError(
        f"claiming node id {store.node_id} of {store.path}: the server's answer kept changing "
        f"over {_MAX_ROUNDS} rounds (another store claiming the same id?); retrying")


def _check_from(reader: WALReader, ident: NodeIdentity, acked: int) -> int:
    """Where to start comparing the server's entries of ``ident`` with the WAL: below
    the acknowledged LSN too, as far as the WAL still holds records. A server put back
    from a backup may have lost what it acknowledged to this store, and taken another
    store's writes under the same LSNs since (a clone that claimed the id first)."""
    oldest = reader.oldest_lsn()
    if oldest is None:
        return acked
    return max(ident.base_lsn, min(acked, oldest - 1))


def count_unreplicated(store: ReplicationSource, after: int, applied: int) -> int:
    """Local records (not merges) in (after, applied]: what a server holding the
    store up to ``after`` lacks. Records the WAL no longer holds count as local."""
    if applied <= after:
        return 0
    reader = store.wal_reader()
    count = 0
    lsn = after
    try:
        oldest = reader.oldest_lsn()
        if oldest is None or oldest > after + 1:
            gone = min(applied, (oldest or applied + 1) - 1)
            count, lsn = gone - after, gone
        while lsn < applied:
            records = reader.read(lsn, applied, 10_000)
            if not records:
                break
            count += sum(1 for rec in records if rec.local)
            lsn = records[-1].lsn
    except LSNGapError:
        return count + (applied - lsn)
    return count + (applied - lsn)


def confirmed_position(store: ReplicationSource, transport: Transport,
                       held: ServerPosition) -> int:
    """The LSN up to which the server holds this store's writes as the store wrote them
    (for `walsync status`, asking nothing but reads): its position for the store's node
    ids, trusted as far as this server acknowledged them to this store, and checked
    against the WAL beyond (a copy of the store may have shipped under the same id)."""
    ledger = store.sync_ledger
    acked = ledger.acked_lsn
    local_server = ledger.server_id
    same = local_server is None or local_server == held.server_id
    cur = store.identities[-1]
    trusted = min(held.acked_lsn, acked) if same else min(held.acked_lsn, cur.base_lsn)
    if held.acked_lsn <= max(trusted, cur.base_lsn):
        return trusted
    return verified_through(transport, store.wal_reader(), cur.node_id,
                            max(trusted, cur.base_lsn), min(held.acked_lsn, store.applied_lsn))
