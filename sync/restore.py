"""Restore after host loss: build a new store from the server, as it is or as it was.

The new store gets a new node id (a lost host's LSNs are never reused: see
the kv679 lesson in sync/PROTOCOL.md "Node identity"). A forced restore into an
existing store gives that store a fresh node id too: the directory may be a stale
copy of a store that lives on elsewhere (the lost host's old disk, say), and its
writes from now on must not share an id with that one's. Every sibling is checked
against its value hash before it is written, and the pull cursor is set to the
server's head as read *before* anything was read, so anything committed during
the restore is pulled afterwards (merging twice changes nothing). Restored runs
need their leases before they resume.

What is restored: every key, the keys under a prefix, or a lost node's runs (each
run whose index entry the node wrote last, with all its keys), and with
``all_keys`` the node's other keys too (each key outside the runs whose current
version the node wrote). The node is named by id or label (sync/nodes.py); an
unknown one is refused with the list of the nodes the server knows.

As of a point (``at`` / ``lsn``: sync/point.py) the state is rebuilt from the
server's entry log instead of its merged state: every entry at or below the cut,
merged by the usual rules through the store's own merge, so siblings that were
concurrent at that point come back as siblings. A lost node's runs at a point
are those whose index entry it had written last *at that point*: the whole log
up to the cut is merged into a scratch store beside the new one first, and the
selection is read from there (a restore killed midway leaves that directory,
``.walsync-restore-*``, beside the new store: delete both and restore again). A
store restored at a point is a fork of the present: its pull cursor is the
server's head, so newer versions are not pulled back in, and what it writes later
meets them as siblings on other replicas.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cbor2
import xxhash

from walsync.engine import Store
from walsync.engine.errors import RestoreError
from walsync.engine.keyspace import RESERVED_PREFIX
from walsync.engine.record import decode_value
from walsync.engine.versions import Sibling, winner
from walsync.engine.workflow import Workflows
from walsync.engine.workflow import keys as run_keys

from .incarnation import verified_through
from .nodes import find_node
from .point import Point, PointReached, at_lsn, at_time, check_window, iter_log, parse_lsn
from .transport import LogRow, NodeList, Transport

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
    #: what was restored, in words: every key, a prefix, a node's runs (and other keys)
    covers: str = "every key"
    lost_node: str | None = None
    lost_node_label: str | None = None
    #: the lost node's runs restored, by run id
    runs: list[str] = field(default_factory=list)
    #: with ``all_keys``: how many of the lost node's other keys were restored (None:
    #: not asked; the node may have written keys outside its runs)
    other_keys: int | None = None
    #: the lost node's last acknowledged LSN and its commit time: the recovery point,
    #: as ISO-8601 UTC and as unix milliseconds (the names `walsync status` uses)
    lost_node_acked_lsn: int | None = None
    recovery_point: str | None = None
    recovery_point_unix_ms: int | None = None
    #: the node id the store had before a forced restore into it (it took a fresh one)
    renewed_from: str | None = None
    #: restored as of a point in time: the point reached (None: the current state)
    point: PointReached | None = None
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


def _checked(key: str, sib: Sibling, value_hash: str | None) -> Sibling:
    if sib.data is None:
        return sib
    where = f"key {key!r} ({sib.version.origin}:{sib.version.lsn})"
    try:
        raw = cbor2.dumps(decode_value(sib.codec, sib.data)) if sib.codec else sib.data
    except Exception as exc:  # noqa: BLE001 - any decode failure is damage
        raise RestoreError(f"value of {where} does not decode: {exc}") from None
    if value_hash and xxhash.xxh3_64_hexdigest(raw) != value_hash:
        raise RestoreError(
            f"checksum mismatch for {where}: the server's bytes do not match the hash "
            "written with them"
        )
    return sib


# -- what a lost node's restore takes ---------------------------------------------------


@dataclass
class _Runs:
    """A lost node's runs: their ids, and the keys that are theirs (each run's record
    and index key, and everything under the record key; not another run's whose id
    begins with this one's), in the spelling each was written in."""

    ids: list[str] = field(default_factory=list)
    roots: set[str] = field(default_factory=set)
    index_keys: set[str] = field(default_factory=set)

    def add(self, grammar: run_keys.Grammar, run_id: str) -> None:
        self.ids.append(run_id)
        self.roots.add(grammar.run(run_id))
        self.index_keys.add(grammar.index(run_id))


def _under(key: str, root: str) -> bool:
    return key == root or key.startswith(root + "/")


def _runs_in(index: Iterable[tuple[str, list[Sibling]]], node: str,
             grammar: run_keys.Grammar, runs: _Runs) -> None:
    for key, sibs in index:
        run_id = key[len(grammar.INDEX):]
        if sibs and run_id and "/" not in run_id and winner(sibs).version.origin == node:
            runs.add(grammar, run_id)


def _state_groups(transport: Transport, prefix: str,
                  page_keys: int) -> Iterator[list[tuple[str, Sibling, str | None]]]:
    """The server's merged state under ``prefix``, a page of keys at a time."""
    after: str | None = None
    while True:
        page = transport.state_page(prefix, after, page_keys)
        yield [(r.key, r.sibling, r.value_hash) for r in page.rows]
        if page.done or page.last_key is None:
            return
        after = page.last_key


def _by_key(rows: list[tuple[str, Sibling, str | None]]) -> Iterator[tuple[str, list[Sibling]]]:
    out: dict[str, list[Sibling]] = {}
    for key, sib, _hash in rows:
        out.setdefault(key, []).append(sib)
    return iter(out.items())


def _is_other_key(key: str, node: str, sibs: list[Sibling]) -> bool:
    """A key of the node's outside the runs: its current version is the node's."""
    return (bool(sibs) and not key.startswith(RESERVED_PREFIX)
            and run_keys.run_of(key) is None and winner(sibs).version.origin == node)


# -- the restore ------------------------------------------------------------------------


def restore(
    transport: Transport,
    dest: str | os.PathLike[str],
    *,
    prefix: str = "",
    lost_node: str | None = None,
    all_keys: bool = False,
    at: str | int | dt.datetime | None = None,
    lsn: str | tuple[str, int] | None = None,
    force: bool = False,
    page_keys: int = 1000,
    page_positions: int = 1000,
    progress: Callable[[int, int], None] | None = None,
) -> RestoreReport:
    """Rebuild a store at ``dest``: all keys, those under ``prefix``, or a lost node's
    runs (``lost_node``: its id or label; ``all_keys``: its other keys too); as the
    server holds them now, or as of a point: ``at`` (a commit time: ISO-8601 with an
    offset, unix milliseconds or an aware datetime) or ``lsn`` (``"NODE:LSN"`` or a
    pair). Durable when it returns: the new store is closed.

    Raises NodeNotFoundError (an unknown node, the known ones listed),
    AmbiguousNodeError, RestorePointError (a point outside the server's window, or
    an LSN the server holds no entry of) or RestoreError (a non-empty ``dest``
    without ``force``, a value whose checksum does not match).
    """
    if at is not None and lsn is not None:
        raise ValueError("restore takes one point: at= or lsn=, not both")
    if lost_node is not None and prefix:
        raise ValueError("restore takes a prefix or a lost node, not both")
    if all_keys and lost_node is None:
        raise ValueError("all_keys= takes the lost node's other keys: name the node")
    started = time.perf_counter()
    target = Path(dest)
    if target.exists() and any(target.iterdir()) and not force:
        raise RestoreError(f"{target} is not empty: restore builds a new store")
    listing: NodeList | None = None
    node_id: str | None = None
    label: str | None = None
    if lost_node is not None or lsn is not None:
        listing = transport.nodes()
    if lost_node is not None:
        assert listing is not None
        found = find_node(listing, lost_node)
        node_id, label = found.node_id, found.label
    point: Point | None = None
    if at is not None:
        point = at_time(at)
    elif lsn is not None:
        assert listing is not None
        name, number = parse_lsn(lsn) if isinstance(lsn, str) else lsn
        point = at_lsn(transport, listing, name, number)
    # the head first: a window read after it covers every entry up to it, so "after the
    # newest entry" is never said of a point a newer entry of this restore passes
    head = transport.head()
    reached = check_window(transport.log_window(), point) if point is not None else None
    existing = (target / "STORE").exists()
    with Store.open(target, create=True) as store:
        renewed_from = _renew_existing(store, transport) if existing else None
        report = RestoreReport(str(target), store.node_id, lost_node=node_id,
                               lost_node_label=label, pull_cursor=head,
                               renewed_from=renewed_from, point=reached)
        if reached is None:
            _restore_current(transport, store, report, prefix, node_id, all_keys, page_keys,
                             progress)
        else:
            _restore_at(transport, store, report, prefix, node_id, all_keys, head,
                        page_positions, progress)
        report.covers = _covers(report, prefix, all_keys)
        store.apply_remote([], pull_cursor=head)
        if node_id is not None:
            status = transport.node_status(node_id)
            report.lost_node_acked_lsn = status.acked_lsn
            if status.acked_hlc:
                report.recovery_point_unix_ms = status.acked_hlc >> 16
                report.recovery_point = recovery_point_iso(report.recovery_point_unix_ms)
        report.resumable_runs = [r.run_id for r in Workflows(store).resumable()]
    report.seconds = time.perf_counter() - started
    return report


def _covers(report: RestoreReport, prefix: str, all_keys: bool) -> str:
    if report.lost_node is None:
        return f"the keys under {prefix!r}" if prefix else "every key"
    who = report.lost_node + (f" ({report.lost_node_label})" if report.lost_node_label else "")
    text = f"the runs whose index entry {who} wrote last ({len(report.runs)})"
    if all_keys:
        return text + f" and its other keys ({report.other_keys})"
    return text + "; not its other keys"


def _newest(rows: list[LogRow]) -> list[tuple[str, Sibling]]:
    """A page of the log as the versions its merge keeps: of each key, each origin's
    newest entry alone, checked. A node's later write to a key dominates its earlier
    ones (sync/PROTOCOL.md "Merge rules": the server's push merges so too), so the
    rest would be dropped by the merge anyway; this spares the new store's WAL."""
    newest: dict[tuple[str, str], LogRow] = {}
    for row in rows:
        ident = (row.key, row.sibling.version.origin)
        held = newest.get(ident)
        if held is None or row.sibling.version.lsn > held.sibling.version.lsn:
            newest[ident] = row
    return [(r.key, _checked(r.key, r.sibling, r.value_hash)) for r in newest.values()]


def _write(store: Store, report: RestoreReport, items: list[tuple[str, Sibling]]) -> None:
    if items:
        store.apply_remote(items)
    report.siblings += len(items)
    report.keys += len({k for k, _ in items})
    report.bytes += sum(len(s.data or b"") for _, s in items)


def _restore_current(transport: Transport, store: Store, report: RestoreReport, prefix: str,
                     node: str | None, all_keys: bool, page_keys: int,
                     progress: Callable[[int, int], None] | None) -> None:
    """From the server's merged state, a page of keys at a time."""
    runs = _Runs()
    if node is not None:
        for grammar in (run_keys.CURRENT, run_keys.LEGACY):
            for rows in _state_groups(transport, grammar.INDEX, page_keys):
                _runs_in(_by_key(rows), node, grammar, runs)
        report.runs = list(runs.ids)
        prefixes = sorted(runs.roots | runs.index_keys)
    else:
        prefixes = [prefix]
    total = sum(transport.state_count(p).keys for p in prefixes)
    for p in prefixes:
        for rows in _state_groups(transport, p, page_keys):
            # a run's own keys: not those of another run whose id begins with its id
            _write(store, report, [(k, _checked(k, s, h)) for k, s, h in rows
                                   if node is None or _under(k, p)])
            if progress is not None:
                progress(report.keys, total)
    if node is not None and all_keys:
        before = report.keys
        for rows in _state_groups(transport, "", page_keys):
            keep = {k for k, sibs in _by_key(rows) if _is_other_key(k, node, sibs)}
            _write(store, report, [(k, _checked(k, s, h)) for k, s, h in rows if k in keep])
        report.other_keys = report.keys - before


def _restore_at(transport: Transport, store: Store, report: RestoreReport, prefix: str,
                node: str | None, all_keys: bool, head: int, page_positions: int,
                progress: Callable[[int, int], None] | None) -> None:
    """From the entry log up to the cut: straight into the new store (every key, a
    prefix), or through a scratch store beside it (a lost node's runs as of then)."""
    reached = report.point
    assert reached is not None
    if node is None:
        for rows, pos in iter_log(transport, prefix, reached.cut_hlc, head, page_positions):
            for row in rows:
                reached.include(row)
            _write(store, report, _newest(rows))
            if progress is not None:
                progress(pos, head)
        report.keys = sum(1 for _ in store.iter_siblings(prefix))
        return
    parent = Path(store.path).resolve().parent
    scratch = Path(tempfile.mkdtemp(prefix=".walsync-restore-", dir=parent))
    try:
        with Store.open(scratch / "store", create=True) as whole:
            for rows, pos in iter_log(transport, "", reached.cut_hlc, head, page_positions):
                for row in rows:
                    reached.include(row)
                items = _newest(rows)
                if items:
                    whole.apply_remote(items)
                if progress is not None:
                    progress(pos, head)
            runs = _Runs()
            for grammar in (run_keys.CURRENT, run_keys.LEGACY):
                _runs_in(whole.iter_siblings(grammar.INDEX), node, grammar, runs)
            report.runs = list(runs.ids)
            for root in sorted(runs.roots | runs.index_keys):
                for key, sibs in whole.iter_siblings(root):
                    if _under(key, root):
                        _write(store, report, [(key, s) for s in sibs])
            if all_keys:
                before = report.keys
                for key, sibs in whole.iter_siblings(""):
                    if _is_other_key(key, node, sibs):
                        _write(store, report, [(key, s) for s in sibs])
                report.other_keys = report.keys - before
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
