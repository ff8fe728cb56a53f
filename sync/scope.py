"""What a store pulls: key prefixes and/or a named group of prefixes (sync/PROTOCOL.md,
"Scoped pull").

Why: every store on one database pulled every host's keys, so a store shared with an
unrelated one took in all of its writes, and a fresh host's first ``remote`` commit
waited behind that backlog. A store declares a ``Scope``; the server reads only the
entries under it, through an index on each key's first segment.

Where it is kept: the STORE file's ``sync_scope`` (engine/FORMAT.md), set by
``set_scope`` (the API), ``walsync scope set`` (the CLI) or ``walsync sync --scope-prefix
/ --scope-group`` (and their config file names), and read again before every pull, so
a change reaches a running replicator at its next pull.

What is pushed: every write of the store, whatever its scope. The scope narrows what a
store takes in, never what it gives: the server is every store's backup (a host-loss
restore finds all its keys there), and the acknowledged LSN, the recovery point and the
WAL's retention floor count every LSN of the store.

Widening: a prefix that enters the scope (set here, or added to the group on the
server) has entries the cursor passed while it was outside. The server names the
prefixes it read each page with; when they cover a prefix the previous page's did not,
that prefix is *filled*: every sibling of it the merged state holds at or below the
position the cursor had then (``scope_backfill``), merged like pulled entries. Later
entries come by the pull itself, so nothing is missed, and a version arriving twice
(a fill cut short by a crash and run again) is equal to one held, which the merge
ignores: each is applied once. The fills to do are recorded before the page that
revealed them is merged. Narrowing stops pulling the prefixes; what was merged stays.

Re-bootstrap: a pull the server refuses because its log compaction collected a
tombstone after the cursor (PullCompactedError) fills the whole scope in the same way,
up to the server's head, and goes on from there (``ScopeKeeper.rebootstrap``). The
server keeps the tombstones it collected (without values) until every node that pulled
has passed them and delivers them with the fills, so a key deleted meanwhile is
deleted here too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from walsync.engine.replication import ReplicationSource

from .transport import PullPage, Transport

__all__ = ["FILL_PAGE_KEYS", "Fill", "Scope", "ScopeKeeper", "load_scope", "pending_fills",
           "plan_fills", "set_scope"]

log = logging.getLogger("walsync.scope")

#: keys per scope_backfill page
FILL_PAGE_KEYS = 500


def _check_prefix(prefix: object) -> str:
    if type(prefix) is not str:
        raise TypeError(f"a scope prefix is text, not {type(prefix).__name__}")
    if prefix and "/" not in prefix:
        raise ValueError(f"scope prefix {prefix!r} must hold a '/' (such as 'app/'): the "
                         "server reads scopes by each key's first segment; '' is every key")
    return prefix


@dataclass(frozen=True)
class Scope:
    """Key prefixes and/or a group of prefixes named on the server; a store pulls the
    keys under any of them. ``Scope()`` (no prefixes, no group) or a prefix ``''`` is
    every key, the default; ``Scope(prefixes=())`` is none (the store only pushes).

    A prefix names at least a key's first segment: it holds a ``'/'`` (``'app/'``,
    ``'tenants/acme/'``); deeper prefixes read the rows of their first segment.
    """

    prefixes: tuple[str, ...] | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        if self.prefixes is not None:
            if isinstance(self.prefixes, str):
                raise TypeError("Scope(prefixes=...) takes a sequence of prefixes, not one")
            checked = tuple(sorted({_check_prefix(p) for p in self.prefixes}))
            object.__setattr__(self, "prefixes", checked)
        if self.group is not None and (type(self.group) is not str or not self.group):
            raise ValueError(f"a scope group is a non-empty name, not {self.group!r}")

    @property
    def everything(self) -> bool:
        return (self.prefixes is None and self.group is None) or "" in (self.prefixes or ())

    def pull_args(self) -> dict[str, Any]:
        """``Transport.pull``'s scope arguments (none for every key: the plain pull)."""
        if self.everything:
            return {}
        return {"prefixes": list(self.prefixes or ()), "group": self.group}

    def describe(self) -> str:
        if self.everything:
            return "every key"
        parts = [repr(p) for p in self.prefixes or ()]
        if self.group is not None:
            parts.append(f"group {self.group!r}")
        return ", ".join(parts) if parts else "no key (push only)"

    def to_doc(self) -> dict[str, Any]:
        return {"prefixes": None if self.prefixes is None else list(self.prefixes),
                "group": self.group}

    @classmethod
    def from_doc(cls, doc: dict[str, Any] | None) -> Scope:
        if not doc:
            return cls()
        prefixes = doc.get("prefixes")
        group = doc.get("group")
        if prefixes is not None and not isinstance(prefixes, list):
            raise ValueError(f"the store's scope has prefixes {prefixes!r}, not a list")
        return cls(None if prefixes is None else tuple(prefixes),
                   group if isinstance(group, str) else None)


def _covered(prefix: str, by: Iterable[str] | None) -> bool:
    """Whether ``by`` (None: every key) covers every key under ``prefix``."""
    return by is None or any(prefix.startswith(q) for q in by)


def load_scope(store: ReplicationSource) -> Scope:
    """The scope the store declares (every key when it declares none)."""
    return Scope.from_doc(store.sync_ledger.scope)


#: serialises changes to a scope document: the caller's thread declares the scope while
#: the replicator's records its fills, each writing only its own fields
_DOC_LOCK = threading.Lock()
#: the fields the pull side keeps in the document (the rest is the declaration)
_KEPT = ("resolved", "left", "fills")


def _update(store: ReplicationSource, fields: dict[str, Any]) -> None:
    with _DOC_LOCK:
        doc = dict(store.sync_ledger.scope or {})
        doc.update(fields)
        store.sync_ledger.set_scope(doc)


def set_scope(store: ReplicationSource, scope: Scope) -> None:
    """Declare what ``store`` pulls, durably (the STORE file); its replicator pulls by it
    from its next pull on, filling in what a widening added. Any thread."""
    _update(store, scope.to_doc())


@dataclass(frozen=True)
class Fill:
    """A part of the scope to fill in from the server's state: the siblings under
    ``prefix`` (under none of ``excluded``) at positions in ``(after, upto]``."""

    prefix: str
    after: int
    upto: int
    excluded: tuple[str, ...] = ()

    def to_doc(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "after": self.after, "upto": self.upto,
                "except": list(self.excluded)}

    @classmethod
    def from_doc(cls, doc: Any) -> Fill | None:
        if not isinstance(doc, dict) or "prefix" not in doc or "upto" not in doc:
            return None
        return cls(str(doc["prefix"]), int(doc.get("after") or 0), int(doc["upto"]),
                   tuple(str(x) for x in doc.get("except") or ()))


def pending_fills(store: ReplicationSource) -> list[Fill]:
    """The fills a widening or a re-bootstrap left to do, oldest first."""
    fills = (store.sync_ledger.scope or {}).get("fills") or []
    return [f for f in map(Fill.from_doc, fills) if f is not None]


def plan_fills(had: list[str] | None, now: list[str] | None, left: dict[str, int],
               after: int) -> list[Fill]:
    """The fills a change of the pulled prefixes from ``had`` to ``now`` (None: every
    key) needs when the cursor is at ``after``; updates ``left`` (prefix -> the position
    up to which its keys were pulled before it left the scope).

    Exactly once: a key's versions up to the position it was pulled through (the
    cursor while its prefix was in the scope, ``left`` once it left) are never filled
    again, and those after ``after`` come by the pull itself.
    """
    had_list = had if had is not None else [""]
    now_list = now if now is not None else [""]
    for p in had_list:  # leaving: pulled through `after`, more precisely than before
        if not _covered(p, now):
            for x in [x for x in left if x.startswith(p)]:
                del left[x]
            left[p] = after
    fills: list[Fill] = []
    for q in now_list:  # entering
        if _covered(q, had):
            continue
        inner = sorted(x for x in left if x.startswith(q) and x != q)
        kept = [p for p in had_list if p.startswith(q)] if had is not None else []
        base = left.get(q, max((v for x, v in left.items() if q.startswith(x) and x != q),
                               default=0))
        pieces = [Fill(q, base, after, tuple(inner + kept))]
        for x in inner:
            pieces.append(Fill(x, left[x], after, tuple(
                [y for y in inner if y != x and y.startswith(x)]
                + [k for k in kept if k.startswith(x)])))
        fills += [f for f in pieces if f.after < f.upto]
        for x in [x for x in left if x.startswith(q)]:
            del left[x]
    return fills


class ScopeKeeper:
    """The pull side's view of the scope: the arguments of each pull, the fills a
    widening or a re-bootstrap leaves, and running them. Used by one thread (the
    replicator's)."""

    def __init__(self, store: ReplicationSource, transport: Transport) -> None:
        self.store = store
        self.transport = transport
        #: entries merged by fills (status)
        self.filled_entries = 0

    # -- the persisted document --------------------------------------------------------

    def _doc(self) -> dict[str, Any]:
        return dict(self.store.sync_ledger.scope or {})

    def _save(self, doc: dict[str, Any]) -> None:
        _update(self.store, {k: doc[k] for k in _KEPT if k in doc})

    @property
    def scope(self) -> Scope:
        return load_scope(self.store)

    def pull(self, after: int, limit: int) -> PullPage:
        """One page by the current scope."""
        return self.transport.pull(self.store.node_id, after, limit,
                                   **self.scope.pull_args())

    def pending(self) -> list[Fill]:
        return pending_fills(self.store)

    def note_page(self, page: PullPage, after: int) -> None:
        """Before merging ``page`` (read from position ``after``): record the fills the
        change of its scope from the previous page's needs."""
        doc = self._doc()
        had = doc.get("resolved")
        now = None if page.scope is None else list(page.scope)
        if now == had:
            return
        left = {str(k): int(v) for k, v in (doc.get("left") or {}).items()}
        new = plan_fills(had, now, left, after)
        for f in new:
            log.info("sync: the scope now covers %r; filling it in from the server's state "
                     "(positions %d..%d)", f.prefix, f.after + 1, f.upto)
        doc["resolved"] = now
        doc["left"] = left
        doc["fills"] = [*(f.to_doc() for f in self.pending()), *(f.to_doc() for f in new)]
        self._save(doc)

    def forget_positions(self) -> None:
        """The cursor starts again from 0 on a server whose positions are not the ones
        counted (another server, one put back from a backup): the positions prefixes
        left the scope at, and the fills bounded by them, mean nothing there. Every
        prefix now in the scope is pulled again from 0; one that enters later is filled
        from 0."""
        _update(self.store, {"left": {}, "fills": []})

    def rebootstrap(self, cursor: int, head: int) -> None:
        """The cursor is behind what the server's log keeps: fill what the scope pulls
        in ``(cursor, head]`` from the server's state (recorded first), after which pulls
        go on from ``head``."""
        doc = self._doc()
        scope = self.scope
        resolved = doc.get("resolved")
        prefixes: list[str]
        if scope.everything:
            prefixes = [""]
        elif scope.group is not None:
            # the group's prefixes as last pulled; every key when never pulled by it
            prefixes = list(resolved) if resolved is not None else [""]
        else:
            prefixes = list(scope.prefixes or ())
        fills = [Fill(p, cursor, head) for p in prefixes if cursor < head]
        doc["fills"] = [*(f.to_doc() for f in self.pending()), *(f.to_doc() for f in fills)]
        self._save(doc)
        log.warning("sync: the server compacted its log past this store's pull cursor "
                    "(position %d); filling the scope (%s) in from its state up to "
                    "position %d", cursor, scope.describe(), head)

    def fill(self, between_pages: Callable[[], object] | None = None) -> int:
        """Run the recorded fills, page by page (``between_pages()`` called between two
        pages); returns the entries merged. A fill cut short (a crash, a fault) runs
        again from its start: the versions it merged already are equal to the ones
        held, which the merge ignores."""
        total = 0
        store = self.store
        for f in self.pending():
            after_key: str | None = None
            while True:
                page = self.transport.scope_backfill(store.node_id, f.prefix, f.after, f.upto,
                                                     f.excluded, after_key, FILL_PAGE_KEYS)
                items = [(r.key, r.sibling) for r in page.rows]
                if items:
                    store.apply_remote(items)
                    total += len(items)
                    self.filled_entries += len(items)
                after_key = page.last_key
                if page.done or after_key is None:
                    break
                if between_pages is not None:
                    between_pages()
            doc = self._doc()
            fills = [g for g in map(Fill.from_doc, doc.get("fills") or []) if g is not None]
            if f in fills:
                fills.remove(f)
            doc["fills"] = [g.to_doc() for g in fills]
            self._save(doc)
        return total
