"""The memory server's twins of scoped pull and of the entry log's retention
(sync/migrations/20261207000010_scope_and_retention.sql): ``pull_scoped`` (and the
plain ``pull``, which is it without a scope), ``scope_group``, ``scope_backfill``,
``log_retention`` and ``compact_log``, by the same rules, answering the same
documents. Kept apart from memory.py so that each file reads as one topic;
``MemoryServer`` takes these methods in by inheritance.

Compaction removes an entry from ``Tables.entries`` and adds its position to
``Tables.compacted`` (its slot in ``log`` stays, so positions still index it); every
reader of the log skips those positions, as a query finds no deleted row.
"""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

from walsync.engine.errors import RemoteRejectedError

from .memory_tables import Entry, Node, Tables

__all__ = ["DEFAULT_RETENTION_SECONDS", "ScopeAndRetention", "lane_of"]

#: the window a database starts with (log_settings.retention_seconds' default)
DEFAULT_RETENTION_SECONDS = 604800.0


def lane_of(key: str) -> str:
    """walsync.key_lane: the text before a key's first '/' (the whole key without one)."""
    return key.split("/", 1)[0]


def _leq(a: dict[str, int], b: dict[str, int]) -> bool:
    return all(v <= b.get(k, 0) for k, v in a.items())


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _checked(prefixes: Any) -> list[str] | None:
    """walsync.scope_prefixes: a JSON array of text, each '' or holding a '/'."""
    if prefixes is None:
        return None
    if type(prefixes) is not list or any(type(p) is not str for p in prefixes):
        raise RemoteRejectedError(f"scope prefixes must be a JSON array of text, not "
                                  f"{prefixes!r:.60} (SQLSTATE 22023)")
    for p in prefixes:
        if p != "" and "/" not in p:
            raise RemoteRejectedError(f"scope prefix {p!r}: a prefix must hold a '/' "
                                      "(SQLSTATE 22023)")
    return list(prefixes)


def _timestamp(micros: int) -> str:
    """As memory.py writes a timestamptz (UTC, trailing zeros of the fraction dropped)."""
    when = dt.datetime.fromtimestamp(micros // 1_000_000, dt.UTC)
    frac = micros % 1_000_000
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    return text + (f".{frac:06d}".rstrip("0") if frac else "") + "+00:00"


def _wire(e: Entry) -> dict[str, Any]:
    return {"pos": e.pos, "origin": e.origin, "lsn": e.lsn, "idx": e.idx, "key": e.key,
            "deleted": e.deleted, "data": _b64(e.data), "codec": e.codec, "vv": dict(e.vv),
            "hlc": e.hlc, "fence": e.fence, "value_hash": e.value_hash}


class ScopeAndRetention:
    """The functions of migration 10 over a MemoryServer's tables (``_t``), called
    under its lock with its clock's ``now`` (microseconds)."""

    _t: Tables

    def live_log(self) -> list[Entry]:
        """The entry log without what compaction removed, in position order."""
        t = self._t
        return [e for e in t.log if e.pos not in t.compacted]

    def _record_end(self, origin: str, lsn: int) -> int:
        t = self._t
        end = t.record_end[(origin, lsn)]
        if end not in t.compacted:
            return end
        return max((e.pos for (o, n, _k), e in t.entries.items() if o == origin and n == lsn),
                   default=0)

    def _fn_pull(self, now: int, p_node: str, p_after: int, p_limit: int) -> dict[str, Any]:
        doc = self._fn_pull_scoped(now, p_node, p_after, p_limit, None, None)
        doc.pop("scope", None)
        return doc

    def _fn_pull_scoped(self, now: int, p_node: str, p_after: int, p_limit: int,
                        p_prefixes: Any, p_group: str | None) -> dict[str, Any]:
        t = self._t
        limit = max(p_limit, 1)
        if 0 < p_after < t.gc_through:
            return {"entries": [], "next": p_after, "head": t.head, "refused": "compacted",
                    "gc_through": t.gc_through}
        scope = _checked(p_prefixes)
        if scope is not None or p_group is not None:
            scope = scope or []
            if p_group is not None:
                if p_group not in t.scope_groups:
                    raise RemoteRejectedError(f'scope group "{p_group}" does not exist '
                                              "(SQLSTATE 22023)")
                scope += t.scope_groups[p_group]
            scope = sorted({p for p in scope
                            if not any(q != p and p.startswith(q) for q in scope)})
            if "" in scope:
                scope = None

        def wanted(e: Entry) -> bool:
            return (e.pos not in t.compacted and e.origin != p_node
                    and (scope is None or any(e.key.startswith(p) for p in scope)))

        if scope is None:
            upper = min(t.head, p_after + limit)
        else:
            found = [e.pos for e in t.log[max(p_after, 0):] if wanted(e)][:limit]
            upper = found[-1] if len(found) >= limit else t.head
        if 1 <= upper <= t.head and upper not in t.compacted:  # finish its record
            last = t.log[upper - 1]
            upper = max(upper, self._record_end(last.origin, last.lsn))
        out = [_wire(e) for e in t.log[max(p_after, 0):max(upper, 0)] if wanted(e)]
        node = t.nodes.get(p_node)
        if node is None:
            t.nodes[p_node] = Node(pull_cursor=p_after, last_pull_at=now)
        else:
            node.pull_cursor = max(node.pull_cursor, p_after)
            node.last_pull_at = now
        return {"entries": out, "next": max(upper, p_after), "head": t.head,
                "scope": scope}

    def _fn_scope_group(self, now: int, p_name: str | None, p_prefixes: Any) -> dict[str, Any]:
        t = self._t
        prefixes = _checked(p_prefixes)
        if prefixes is not None:
            if not p_name:
                raise RemoteRejectedError("a scope group needs a name (SQLSTATE 22023)")
            if prefixes:
                t.scope_groups[p_name] = tuple(sorted(set(prefixes)))
            else:
                t.scope_groups.pop(p_name, None)
        return {"groups": [{"name": n, "prefixes": list(p)}
                           for n, p in sorted(t.scope_groups.items())
                           if p_name is None or n == p_name]}

    def _fn_scope_backfill(self, now: int, p_node: str, p_prefix: str | None,
                           p_after_pos: int | None, p_upto: int, p_except: Any,
                           p_after_key: str | None, p_limit: int) -> dict[str, Any]:
        prefix = p_prefix or ""
        _checked([prefix])
        excluded = _checked(p_except) or []
        limit = max(p_limit, 1)
        low = p_after_pos or 0

        def held(s: Entry) -> bool:
            return low < s.pos <= p_upto and s.origin != p_node

        # the stored siblings, and the tombstones compaction collected
        stored: dict[str, list[Entry]] = {k: list(v) for k, v in self._t.siblings.items()}
        for (k, _o, _n), tomb in self._t.collected.items():
            stored.setdefault(k, []).append(tomb)
        keys = sorted(k for k, v in stored.items()
                      if k.startswith(prefix) and (p_after_key is None or k > p_after_key)
                      and not any(k.startswith(x) for x in excluded)
                      and any(held(s) for s in v))
        page = keys[:limit]
        rows = [{"key": k, "origin": s.origin, "lsn": s.lsn, "pos": s.pos,
                 "deleted": s.deleted, "data": _b64(s.data), "codec": s.codec,
                 "vv": dict(s.vv), "hlc": s.hlc, "fence": s.fence, "value_hash": s.value_hash}
                for k in page
                for s in sorted(stored[k], key=lambda s: (s.origin, s.lsn))
                if held(s)]
        return {"rows": rows, "last_key": page[-1] if page else None, "done": len(page) < limit}

    def _retention_doc(self) -> dict[str, Any]:
        t = self._t
        return {"retention_seconds": t.retention_seconds or DEFAULT_RETENTION_SECONDS,
                "gc_through": t.gc_through, "window_start_hlc": t.window_start_hlc,
                "compacted_at": None if t.compacted_at is None
                else _timestamp(t.compacted_at),
                "compacted_entries": t.compacted_entries}

    def _fn_log_retention(self, now: int, p_retention_seconds: float | None) -> dict[str, Any]:
        if p_retention_seconds is not None:
            if not 0 < p_retention_seconds < float("inf"):
                raise RemoteRejectedError("the retention window must be a positive number of "
                                          f"seconds, not {p_retention_seconds} "
                                          "(SQLSTATE 22023)")
            self._t.retention_seconds = float(p_retention_seconds)
        return self._retention_doc()

    def _fn_compact_log(self, now: int) -> dict[str, Any]:
        t = self._t
        window = t.retention_seconds or DEFAULT_RETENTION_SECONDS
        t.retention_seconds = window
        boundary = (now // 1000 - int(window * 1000)) << 16
        live = [n.pull_cursor for n in t.nodes.values()
                if n.last_pull_at is not None and n.last_pull_at > now - window * 1e6]
        floor = min(live) if live else t.head

        def remove(e: Entry) -> None:
            t.compacted.add(e.pos)
            del t.entries[(e.origin, e.lsn, e.key)]

        # tombstones that are all their key holds: collected with what they dominate
        collected = [(k, v[0]) for k, v in t.siblings.items()
                     if len(v) == 1 and v[0].deleted and v[0].hlc < boundary
                     and v[0].pos <= floor]
        removed = 0
        for key, tomb in collected:
            del t.siblings[key]
            t.collected.setdefault(
                (key, tomb.origin, tomb.lsn),
                Entry(tomb.pos, tomb.origin, tomb.lsn, 0, key, True, None, 0, dict(tomb.vv),
                      tomb.hlc, tomb.fence, None))
            for e in [e for e in t.entries.values() if e.key == key and _leq(e.vv, tomb.vv)]:
                remove(e)
                removed += 1
        t.gc_through = max([t.gc_through, *(tomb.pos for _, tomb in collected)])
        # older than the window and dominated by another entry as old (one statement:
        # every candidate judged against the log as it was before it)
        old: dict[str, list[Entry]] = {}
        for e in t.entries.values():
            if e.hlc < boundary:
                old.setdefault(e.key, []).append(e)
        current = {(s.origin, s.lsn, k) for k, v in t.siblings.items() for s in v}
        doomed = [e for group in old.values() for e in group
                  if (e.origin, e.lsn, e.key) not in current
                  and any(f is not e and (f.origin, f.lsn) != (e.origin, e.lsn)
                          and _leq(e.vv, f.vv)
                          and (not _leq(f.vv, e.vv) or (f.origin, f.lsn) > (e.origin, e.lsn))
                          for f in group)]
        for e in doomed:
            remove(e)
        # collected tombstones every node that ever pulled has pulled past
        pulled = [n.pull_cursor for n in t.nodes.values() if n.last_pull_at is not None]
        passed = min(pulled) if pulled else 0
        for ident in [i for i, tomb in t.collected.items() if tomb.pos <= passed]:
            del t.collected[ident]
        t.window_start_hlc = max(t.window_start_hlc, boundary)
        t.compacted_at = now
        t.compacted_entries += removed + len(doomed)
        return {"ran": True, "removed_entries": removed + len(doomed),
                "collected_tombstones": len(collected), "gc_through": t.gc_through,
                "window_start_hlc": t.window_start_hlc}
