"""The in-memory reference transport: the ``walsync_api`` functions in Python.

``MemoryServer`` holds what a migrated database holds (the server's id, nodes, the
head, the entry log, the merged siblings, leases and the entries fencing refused)
and answers each function of sync/migrations with the document the SQL answers,
by the same rules: push with duplicates skipped by (origin, LSN, key), fencing by
the lease's holder and token, each key's newest new version merged by the shared
rules (engine/versions.py), pull by position without gaps, whole records only,
claims of node incarnations, restore's pages. ``MemoryTransport`` is an
RpcTransport whose calls go to a MemoryServer in the same process, so its answers
pass the same checks as PostgreSQL's, and the contract suite
(tests/sync/test_transport_contract.py) holds it to the SQL's answers.
(Over 500 lines: a twin of every server function; push's rules are in memory_tables.py.)

What it is for: testing the replicator, restore, leases and node identity without
a database, and a reference of the protocol a reader can follow (push's rules are in
memory_tables.py). What it is not: durable, shared between processes, or tenant mode
(one tenant only); the hand-made JSON form of push is not offered.

Faults a test can cause: ``stop()`` (every call fails as unreachable until
``start()``), a server not yet ``migrate()``d (RemoteSchemaError), a transport
presenting a key the server was not made with (RemoteAuthError), ``backup()`` and
``put_back()`` (a database restored from a backup: the same server, behind), and
another MemoryServer (another server: another id).

Threads: any; calls run one at a time, each as one transaction (it changes nothing
when it raises).
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import inspect
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from walsync.engine.errors import (
    RemoteAuthError,
    RemoteRejectedError,
    RemoteSchemaError,
    RemoteUnavailableError,
)
from walsync.engine.workflow.keys import record_keys

from .memory_scope import ScopeAndRetention
from .memory_tables import (
    Backup,
    Entry,
    Lease,
    Node,
    Plan,
    Refused,
    Tables,
    check_text,
    plan_push,
    rejected,
    rows_of,
)
from .remote import RpcTransport, push_ack, push_arrays
from .transport import PushAck, WireBatch, WireEntry

__all__ = ["Backup", "MemoryServer", "MemoryTransport"]


def _timestamp(micros: int) -> str:
    """A time as PostgreSQL writes a timestamptz into jsonb (UTC, trailing zeros of the
    fraction dropped)."""
    when = dt.datetime.fromtimestamp(micros // 1_000_000, dt.UTC)
    frac = micros % 1_000_000
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    return text + (f".{frac:06d}".rstrip("0") if frac else "") + "+00:00"


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


# -- the server -------------------------------------------------------------------------


class MemoryServer(ScopeAndRetention):
    """A sync server in memory, answering the ``walsync_api`` functions (see the module
    docstring). ``key``: the key a transport must present (None: any)."""

    def __init__(self, *, migrated: bool = True, key: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._t = Tables(str(uuid.uuid4()))
        self._migrated = migrated
        self._key = key
        self._clock = clock
        self._last_now = 0
        self._up = True
        #: every call made, by function name (tests count them)
        self.calls: dict[str, int] = {}

    # -- what a test does to the server

    def transport(self, key: str | None = None) -> MemoryTransport:
        """A transport to this server presenting ``key`` (default: the server's own)."""
        return MemoryTransport(self, key=self._key if key is None else key)

    def migrate(self) -> None:
        with self._lock:
            self._migrated = True

    def stop(self) -> None:
        """Calls fail as unreachable (RemoteUnavailableError) until ``start``."""
        self._up = False

    def start(self) -> None:
        self._up = True

    def backup(self) -> Backup:
        with self._lock:
            return Backup(copy.deepcopy(self._t))

    def put_back(self, backup: Backup) -> None:
        """Hold what ``backup`` held, and nothing since (the server's id included: a
        dump restored is the same server)."""
        with self._lock:
            self._t = copy.deepcopy(backup.tables)

    # -- what a test reads of the tables

    @property
    def server_id(self) -> str:
        return self._t.server_id

    def entries(self) -> list[dict[str, Any]]:
        """``walsync.entries`` in position order (``data`` as bytes)."""
        with self._lock:
            return [self._row(e) for e in self.live_log()]

    def siblings(self) -> dict[str, list[dict[str, Any]]]:
        """``walsync.siblings`` by key, each key's rows by (origin, LSN)."""
        with self._lock:
            return {k: [self._row(s) for s in sorted(v, key=lambda s: (s.origin, s.lsn))]
                    for k, v in sorted(self._t.siblings.items()) if v}

    def state(self) -> dict[str, dict[str, Any]]:
        """``walsync.state``: each key's winner (fence, HLC, origin, LSN)."""
        with self._lock:
            return {k: self._row(max(v, key=lambda s: (s.fence, s.hlc, s.origin, s.lsn)))
                    for k, v in sorted(self._t.siblings.items()) if v}

    def refused(self) -> list[dict[str, Any]]:
        """``walsync.fenced`` by (origin, LSN, key)."""
        with self._lock:
            return [vars(r).copy() for _, r in sorted(self._t.fenced.items())]

    def node_row(self, node_id: str) -> dict[str, Any] | None:
        with self._lock:
            node = self._t.nodes.get(node_id)
            return None if node is None else vars(node).copy()

    def set_lease(self, run_id: str, *, token: int | None = None,
                  expire: bool = False) -> None:
        """Change a lease row in place, as a test may in SQL (its token; expired now)."""
        with self._lock:
            lease = self._t.leases[run_id]
            if token is not None:
                lease.token = token
            if expire:
                lease.expires_at = self._now()

    @staticmethod
    def _row(e: Entry) -> dict[str, Any]:
        row = vars(e).copy()
        row["vv"] = dict(e.vv)
        return row

    # -- the calls

    def call(self, function: str, args: dict[str, Any], key: str | None = None) -> Any:
        """Run ``walsync_api.<function>(**args)``: its answer, a fresh JSON document."""
        where = f"{function} on memory server {self._t.server_id[:8]}"
        if not self._up:
            raise RemoteUnavailableError(f"{where}: the server is stopped")
        if self._key is not None and key != self._key:
            raise RemoteAuthError(f"{where}: the server refused the key (SQLSTATE 28P01)")
        handler = getattr(self, f"_fn_{function}", None) if function.isidentifier() else None
        if not self._migrated or handler is None:
            raise RemoteSchemaError(f"{where}: function walsync_api.{function} does not exist "
                                    "(SQLSTATE 42883)")
        try:
            inspect.signature(handler).bind(0, **args)
        except TypeError:
            raise RemoteSchemaError(f"{where}: function walsync_api.{function}"
                                    f"({', '.join(args)}) does not exist (SQLSTATE 42883)"
                                    ) from None
        with self._lock:
            self.calls[function] = self.calls.get(function, 0) + 1
            return handler(self._now(), **args)

    def _now(self) -> int:
        """The server's clock in microseconds, moving forward between calls."""
        now = max(int(self._clock() * 1_000_000), self._last_now + 1)
        self._last_now = now
        return now

    def _fn_head(self, now: int) -> dict[str, Any]:
        return {"head": self._t.head, "schema_version": 1}

    def _fn_node_status(self, now: int, p_node: str) -> dict[str, Any]:
        node = self._t.nodes.get(p_node)
        if node is None:
            return {"node_id": p_node, "acked_lsn": 0, "acked_hlc": 0, "pull_cursor": 0}
        return {"node_id": p_node, "acked_lsn": node.acked_lsn, "acked_hlc": node.acked_hlc,
                "pull_cursor": node.pull_cursor,
                "last_push_at": None if node.last_push_at is None
                else _timestamp(node.last_push_at),
                "last_pull_at": None if node.last_pull_at is None
                else _timestamp(node.last_pull_at)}

    def _fn_push(self, now: int, p_node: str | None, p_through_lsn: int | None,
                 p_lsn: Any, p_idx: Any, p_key: Any, p_deleted: Any, p_data: Any, p_codec: Any,
                 p_vv: Any, p_hlc: Any, p_fence: Any, p_value_hash: Any,
                 p_value_json: Any) -> dict[str, Any]:
        if not p_node:
            raise rejected("push needs a node id (SQLSTATE 22023)")
        check_text(p_node, "the node id")
        rows = rows_of({"p_lsn": p_lsn, "p_idx": p_idx, "p_key": p_key, "p_deleted": p_deleted,
                      "p_data": p_data, "p_codec": p_codec, "p_vv": p_vv, "p_hlc": p_hlc,
                      "p_fence": p_fence, "p_value_hash": p_value_hash,
                      "p_value_json": p_value_json})
        return self._apply(now, plan_push(self._t, p_node, rows), p_through_lsn)

    def _apply(self, now: int, plan: Plan, through: int | None) -> dict[str, Any]:
        t = self._t
        node = t.nodes.setdefault(plan.node, Node())
        for r, run, lease in plan.refused:
            ident = (plan.node, r.lsn, r.key)
            if ident not in t.fenced:
                t.fenced[ident] = Refused(plan.node, r.lsn, r.key, run, r.fence, lease.token,
                                           lease.holder, r.data)
        gone = {id(s) for s in plan.dropped}
        for r in plan.merged:
            t.siblings[r.key] = [s for s in t.siblings.get(r.key, []) if id(s) not in gone]
        positions: dict[int, int] = {}
        for r in plan.new:
            # (checked by _plan: a new row has every column)
            assert r.idx is not None
            assert r.deleted is not None
            assert r.codec is not None
            assert r.vv is not None
            assert r.hlc is not None
            e = Entry(t.head + 1, plan.node, r.lsn, r.idx, r.key, r.deleted, r.data, r.codec,
                       dict(r.vv), r.hlc, r.fence, r.value_hash)
            t.log.append(e)
            t.entries[(plan.node, r.lsn, r.key)] = e
            end = (plan.node, r.lsn)
            t.record_end[end] = max(t.record_end.get(end, 0), e.pos)
            positions[r.n] = e.pos
        for r in plan.merged:
            stored = replace(t.entries[(plan.node, r.lsn, r.key)], pos=positions[r.n],
                             value_json=None if r.value_json is None
                             else json.loads(r.value_json))
            t.siblings[r.key].append(stored)
        node.acked_lsn = max(node.acked_lsn, through or 0)
        node.acked_hlc = max(node.acked_hlc, plan.max_hlc or 0)
        node.last_push_at = now
        runs = {(lease.holder, run, lease.token) for _, run, lease in plan.refused}
        return {"acked_lsn": node.acked_lsn, "inserted": len(plan.new),
                "merged": len(plan.merged), "head": t.head,
                "fenced": [{"run_id": run, "current": token, "holder": holder}
                           for holder, run, token in sorted(runs)]}

    def _fn_push_claimed(self, now: int, p_node: str | None, p_incarnation: str | None,
                         p_base_lsn: int | None, p_after_lsn: int | None,
                         p_through_lsn: int | None, p_lsn: Any, p_idx: Any, p_key: Any,
                         p_deleted: Any, p_data: Any, p_codec: Any, p_vv: Any, p_hlc: Any,
                         p_fence: Any, p_value_hash: Any, p_value_json: Any) -> dict[str, Any]:
        if not p_node:
            raise rejected("push needs a node id (SQLSTATE 22023)")
        check_text(p_node, "the node id")
        t = self._t
        base = p_base_lsn or 0
        node = t.nodes.get(p_node) or Node(acked_lsn=max(base, 0))
        acked = max(node.acked_lsn, base)
        reason = None
        if p_incarnation is not None and node.incarnation != p_incarnation:
            reason = "taken"
        elif acked < (p_after_lsn or 0):
            reason = "behind"
        if reason is not None:  # nothing stored; the node's row is kept
            t.nodes.setdefault(p_node, node)
            return {"refused": reason, "acked_lsn": acked, "inserted": 0, "merged": 0,
                    "head": t.head, "fenced": [], "server_id": t.server_id}
        plan = None
        if p_lsn:  # decided before anything changes: a push that fails changes nothing
            plan = plan_push(t, p_node, rows_of({
                "p_lsn": p_lsn, "p_idx": p_idx, "p_key": p_key, "p_deleted": p_deleted,
                "p_data": p_data, "p_codec": p_codec, "p_vv": p_vv, "p_hlc": p_hlc,
                "p_fence": p_fence, "p_value_hash": p_value_hash,
                "p_value_json": p_value_json}))
        t.nodes.setdefault(p_node, node)
        node.acked_lsn = acked
        if plan is None:  # records with nothing for the server (merges): acknowledged
            node.acked_lsn = max(node.acked_lsn, p_through_lsn or 0)
            node.last_push_at = now
            return {"acked_lsn": node.acked_lsn, "inserted": 0, "merged": 0, "head": t.head,
                    "fenced": [], "server_id": t.server_id}
        return {**self._apply(now, plan, p_through_lsn), "server_id": t.server_id}

    # pull, pull_scoped, scope_group, scope_backfill, log_retention, compact_log:
    # memory_scope.py

    def _fn_hello(self, now: int, p_node: str | None, p_tokens: Any, p_new_token: str | None,
                  p_acked_lsn: int | None, p_base_lsn: int | None) -> dict[str, Any]:
        if not p_node:
            raise RemoteRejectedError("hello needs a node id (SQLSTATE 22023)")
        t = self._t
        base = p_base_lsn or 0
        if p_new_token is not None and p_node not in t.nodes:
            t.nodes[p_node] = Node(acked_lsn=max(base, 0))
        node = t.nodes.get(p_node)
        acked = max(node.acked_lsn if node else 0, base)
        tokens = p_tokens if type(p_tokens) is list else []
        reason = None
        if node is not None and node.incarnation is not None and node.incarnation not in tokens:
            reason = "taken"
        elif acked > (p_acked_lsn or 0):
            reason = "ahead"
        elif p_new_token is not None and node is not None:
            node.incarnation, node.claimed_at, node.acked_lsn = p_new_token, now, acked
        return {"server_id": t.server_id, "node_id": p_node, "reason": reason,
                "claimed": reason is None and p_new_token is not None, "acked_lsn": acked,
                "acked_hlc": node.acked_hlc if node else 0, "head": t.head}

    def _fn_node_entries(self, now: int, p_node: str, p_after: int,
                         p_upto: int) -> dict[str, Any]:
        rows: list[tuple[int, str, str | None, int | None]] = []
        for (origin, lsn, key), e in self._t.entries.items():
            if origin == p_node and p_after < lsn <= p_upto:
                rows.append((lsn, key, _md5(e.data), e.hlc))
        for (origin, lsn, key), f in self._t.fenced.items():
            if origin == p_node and p_after < lsn <= p_upto:
                rows.append((lsn, key, _md5(f.data), None))
        rows.sort(key=lambda r: (r[0], r[1]))
        return {"rows": [{"lsn": lsn, "key": key, "md5": md5, "hlc": hlc}
                         for lsn, key, md5, hlc in rows]}

    def _fn_state_page(self, now: int, p_prefix: str | None, p_after_key: str | None,
                       p_limit: int) -> dict[str, Any]:
        prefix, limit = p_prefix or "", max(p_limit, 1)
        keys = sorted(k for k, v in self._t.siblings.items()
                      if v and k.startswith(prefix) and (p_after_key is None or k > p_after_key))
        page = keys[:limit]
        rows = [{"key": k, "origin": s.origin, "lsn": s.lsn, "deleted": s.deleted,
                 "data": _b64(s.data), "codec": s.codec, "vv": dict(s.vv), "hlc": s.hlc,
                 "fence": s.fence, "value_hash": s.value_hash}
                for k in page
                for s in sorted(self._t.siblings[k], key=lambda s: (s.origin, s.lsn))]
        return {"rows": rows, "last_key": page[-1] if page else None, "done": len(page) < limit}

    def _fn_state_count(self, now: int, p_prefix: str | None) -> dict[str, Any]:
        prefix = p_prefix or ""
        held = [v for k, v in self._t.siblings.items() if v and k.startswith(prefix)]
        return {"keys": len(held), "bytes": sum(len(s.data or b"") for v in held for s in v)}

    def _fn_conflicts(self, now: int, p_prefix: str | None,
                      p_limit: int | None) -> list[dict[str, Any]]:
        if p_prefix is None:  # like null: nothing matches
            return []
        if p_limit is not None and p_limit < 0:
            raise RemoteRejectedError("conflicts: LIMIT must not be negative (SQLSTATE 2201W)")
        found = []
        for k, v in sorted(self._t.siblings.items()):
            versions = len({(s.deleted, s.value_hash or "") for s in v})
            if k.startswith(p_prefix) and versions > 1:
                found.append({"key": k, "versions": versions})
        return found if p_limit is None else found[:p_limit]

    # leases: expiry by this server's clock alone

    def _grant(self, acquired: bool, run_id: str, lease: Lease, now: int) -> dict[str, Any]:
        return {"acquired": acquired, "run_id": run_id, "holder": lease.holder,
                "token": lease.token, "expires_at": _timestamp(lease.expires_at),
                "now": _timestamp(now)}

    def _fn_lease_acquire(self, now: int, p_run_id: str, p_holder: str,
                          p_ttl_seconds: float | None) -> dict[str, Any]:
        if p_ttl_seconds is None or p_ttl_seconds <= 0:
            raise RemoteRejectedError("lease TTL must be positive (SQLSTATE 22023)")
        expires = now + round(p_ttl_seconds * 1_000_000)
        lease = self._t.leases.get(p_run_id)
        floor = 0
        if lease is None or (lease.holder != p_holder and lease.expires_at <= now):
            # above every token the run's record was written with here
            floor = max((s.fence for k in record_keys(p_run_id)
                         for s in self._t.siblings.get(k, [])), default=0)
        if lease is None:
            lease = self._t.leases[p_run_id] = Lease(p_holder, floor + 1, expires, now)
            return self._grant(True, p_run_id, lease, now)
        if lease.holder == p_holder or lease.expires_at <= now:
            if lease.holder != p_holder:
                lease.token = max(lease.token, floor) + 1
                lease.acquired_at = now
            lease.holder, lease.expires_at = p_holder, expires
            return self._grant(True, p_run_id, lease, now)
        return self._grant(False, p_run_id, lease, now)

    def _fn_lease_renew(self, now: int, p_run_id: str, p_holder: str, p_token: int,
                        p_ttl_seconds: float | None) -> dict[str, Any]:
        lease = self._t.leases.get(p_run_id)
        if lease is not None and lease.holder == p_holder and lease.token == p_token:
            if p_ttl_seconds is None:
                raise RemoteRejectedError("lease_renew: a null TTL makes a null expiry "
                                          "(SQLSTATE 23502)")
            lease.expires_at = now + round(p_ttl_seconds * 1_000_000)
            return {"renewed": True, "token": lease.token,
                    "expires_at": _timestamp(lease.expires_at)}
        return {"renewed": False, "holder": lease.holder if lease else None,
                "token": lease.token if lease else None,
                "expires_at": _timestamp(lease.expires_at) if lease else None}

    def _fn_lease_release(self, now: int, p_run_id: str, p_holder: str,
                          p_token: int) -> dict[str, Any]:
        lease = self._t.leases.get(p_run_id)
        released = lease is not None and lease.holder == p_holder and lease.token == p_token
        if lease is not None and released:
            lease.expires_at = now
        return {"released": released}

    # nodes, and the entry log as of a point in time

    def _fn_nodes(self, now: int) -> dict[str, Any]:
        t = self._t

        def stamp(micros: int | None) -> str | None:
            return None if micros is None else _timestamp(micros)

        return {"now": _timestamp(now), "head": t.head, "nodes": [
            {"node_id": node_id, "label": n.label, "acked_lsn": n.acked_lsn,
             "acked_hlc": n.acked_hlc, "pull_cursor": n.pull_cursor,
             "first_push_at": stamp(n.first_push_at), "last_push_at": stamp(n.last_push_at),
             "last_pull_at": stamp(n.last_pull_at), "claimed_at": stamp(n.claimed_at),
             "leases": sorted((run for run, lease in t.leases.items()
                               if lease.holder == node_id and lease.expires_at > now),
                              key=str.encode)}
            for node_id, n in sorted(t.nodes.items(), key=lambda item: item[0].encode())]}

    def _fn_node_label(self, now: int, p_node: str, p_label: str | None,
                       p_replace: bool | None) -> dict[str, Any]:
        if p_label is not None and not 1 <= len(p_label) <= 200:
            raise RemoteRejectedError(f"a node label has 1 to 200 characters, not {len(p_label)}"
                                      " (SQLSTATE 22023)")
        node = self._t.nodes.get(p_node)
        if node is not None and (p_replace is None or p_replace or node.label is None):
            node.label = p_label
        return {"node_id": p_node, "known": node is not None,
                "label": None if node is None else node.label}

    def _fn_log_window(self, now: int) -> dict[str, Any]:
        hlcs = [e.hlc for e in self.live_log()]
        # after a compaction, the oldest cut held exactly is its boundary
        return {"from_hlc": max(min(hlcs), self._t.window_start_hlc) if hlcs else None,
                "to_hlc": max(hlcs, default=None),
                "entries": len(hlcs), "head": self._t.head}

    def _fn_log_page(self, now: int, p_prefix: str | None, p_upto_hlc: int, p_after: int,
                     p_limit: int) -> dict[str, Any]:
        t = self._t
        upper = min(t.head, max(p_after, 0) + max(p_limit, 1))
        out = [{"pos": e.pos, "origin": e.origin, "lsn": e.lsn, "idx": e.idx, "key": e.key,
                "deleted": e.deleted, "data": _b64(e.data), "codec": e.codec,
                "vv": dict(e.vv), "hlc": e.hlc, "fence": e.fence, "value_hash": e.value_hash}
               for e in t.log[max(p_after, 0):max(upper, 0)]
               if e.pos not in t.compacted and e.hlc <= p_upto_hlc
               and e.key.startswith(p_prefix or "")]
        return {"entries": out, "next": max(upper, p_after), "head": t.head}

    def _fn_entry_point(self, now: int, p_node: str, p_lsn: int) -> dict[str, Any]:
        lsns: dict[int, int] = {}
        for (origin, lsn, _key), e in self._t.entries.items():
            if origin == p_node:
                lsns[lsn] = max(lsns.get(lsn, 0), e.hlc)
        return {"node_id": p_node, "lsn": p_lsn, "hlc": lsns.get(p_lsn),
                "before": max((n for n in lsns if n < p_lsn), default=None),
                "after": min((n for n in lsns if n > p_lsn), default=None)}

    def _fn_leases(self, now: int, p_holder: str | None) -> list[dict[str, Any]]:
        return [{"run_id": run, "holder": lease.holder, "token": lease.token,
                 "expires_at": _timestamp(lease.expires_at), "live": lease.expires_at > now}
                for run, lease in sorted(self._t.leases.items())
                if p_holder is None or lease.holder == p_holder]


def _md5(data: bytes | None) -> str | None:
    return None if data is None else hashlib.md5(data).hexdigest()


class MemoryTransport(RpcTransport):
    """The ``memory`` transport: calls to a MemoryServer in this process, their answers
    checked like PostgreSQL's. Thread rules: like any transport, one thread at a time."""

    name = "memory"

    def __init__(self, server: MemoryServer, *, key: str | None = None) -> None:
        self.server = server
        self._key = key
        self.where = f"memory server {server.server_id[:8]}"

    def call(self, function: str, args: dict[str, Any]) -> Any:
        return self.server.call(function, args, self._key)

    def push(self, node_id: str, through_lsn: int, entries: list[WireEntry]) -> PushAck:
        arrays = push_arrays(entries, vv_as_text=False)
        claim = entries.claim if isinstance(entries, WireBatch) else None
        if claim is not None:
            return push_ack(self.call("push_claimed", {
                "p_node": node_id, "p_incarnation": claim.incarnation,
                "p_base_lsn": claim.base_lsn, "p_after_lsn": claim.after_lsn,
                "p_through_lsn": through_lsn, **arrays}))
        return push_ack(self.call("push", {"p_node": node_id, "p_through_lsn": through_lsn,
                                           **arrays}))

    def close(self) -> None:
        """Nothing to close: the server lives on (a new call works, as a reconnect)."""
