"""The dashboard's JSON documents, read from an open store. Pure reads: no writes, no network.

Each function takes a store (opened read-only beside a live writer, or not) and
returns a dict the HTTP layer serialises as it is. Values go out as JSON:
datetimes as ISO 8601 text, bytes as ``{"$bytes": hex}``, anything else
cbor2 can decode as its ``str``. Step outputs are sent as previews; the full
value is a request of its own, so a run with large outputs stays light to poll.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from walsync.engine import Store
from walsync.engine.base import read_base_lsn
from walsync.engine.check import VerifyReport
from walsync.engine.errors import WalsyncError
from walsync.engine.layout import StoreLayout
from walsync.engine.lock import read_holder_pid, writer_is_alive
from walsync.engine.workflow import RUN_STATUSES, Cost, Run, StepRecord, Workflows, keys

__all__ = [
    "CONFLICTS_LIMIT",
    "FULL_OUTPUT_CHARS",
    "PREVIEW_CHARS",
    "RUNS_LIMIT",
    "conflicts",
    "health",
    "jsonable",
    "preview",
    "run_detail",
    "runs_page",
    "step_output",
    "verify_summary",
]

#: characters of a value's JSON shown before "show all"
PREVIEW_CHARS = 240
#: the most of one output the dashboard sends when asked for all of it
FULL_OUTPUT_CHARS = 1 << 20
#: runs listed at most (newest first); the counts cover them all
RUNS_LIMIT = 500
#: keys with siblings listed at most
CONFLICTS_LIMIT = 200
#: a restoration keeps the run record it replaced under this name among the steps
_REPLACED_RUN = "__run__"


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (see the module's docstring)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [jsonable(v) for v in obj]
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    if isinstance(obj, dt.datetime):
        return obj.isoformat()
    if isinstance(obj, bytes):
        return {"$bytes": obj.hex()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return str(obj)


def _json_text(value: Any, *, indent: int | None = None) -> str:
    return json.dumps(jsonable(value), ensure_ascii=False, indent=indent,
                      separators=None if indent else (",", ":"))


def preview(value: Any, chars: int = PREVIEW_CHARS) -> dict[str, Any]:
    """The start of ``value``'s JSON, its full length, and whether it was cut."""
    text = _json_text(value)
    return {"text": text[:chars], "chars": len(text), "truncated": len(text) > chars}


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, dt.datetime) else None


def _cost(raw: Mapping[str, Any] | None) -> dict[str, Any]:
    c = Cost.from_dict(dict(raw or {}))
    return {"usd": c.usd, "tokens_in": c.tokens_in, "tokens_out": c.tokens_out,
            "counters": jsonable(c.counters)}


def _error(raw: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not raw:
        return None
    return {"type": str(raw.get("type") or "Error"), "message": str(raw.get("message") or ""),
            "traceback": str(raw.get("traceback") or "")}


# -- runs ------------------------------------------------------------------------------


def runs_page(store: Store, *, statuses: frozenset[str] = frozenset(), query: str = "",
              limit: int = RUNS_LIMIT) -> dict[str, Any]:
    """Runs matching the filters, newest update first, with counts by status of all runs.

    The index entries (status, workflow, times) decide the filters and the
    counts, so only the runs shown have their records read.
    """
    needle = query.strip().lower()
    counts = dict.fromkeys(sorted(RUN_STATUSES), 0)
    matched: list[tuple[str, dict[str, Any]]] = []
    total = 0
    for key, entry in store.scan(keys.INDEX):
        if not isinstance(entry, dict):
            continue
        run_id = key[len(keys.INDEX):]
        status = str(entry.get("status"))
        total += 1
        counts[status] = counts.get(status, 0) + 1
        if statuses and status not in statuses:
            continue
        if needle and needle not in run_id.lower() \
                and needle not in str(entry.get("workflow", "")).lower():
            continue
        matched.append((run_id, entry))
    epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
    matched.sort(key=lambda item: _aware(item[1].get("updated_at")) or epoch, reverse=True)
    runs = []
    for run_id, _entry in matched[:limit]:
        raw = store.get(keys.run(run_id))
        if isinstance(raw, dict):
            runs.append(_run_summary(raw))
    return {"runs": runs, "counts": counts, "total": total, "matched": len(matched),
            "limit": limit}


def _aware(value: Any) -> dt.datetime | None:
    if not isinstance(value, dt.datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _run_summary(raw: Mapping[str, Any]) -> dict[str, Any]:
    metadata = raw.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    return {
        "run_id": str(raw.get("run_id")),
        "workflow": str(raw.get("workflow")),
        "workflow_version": jsonable(raw.get("workflow_version")),
        "status": str(raw.get("status")),
        "progress": float(raw.get("progress") or 0.0),
        "steps_done": int(raw.get("steps_done") or 0),
        "total_steps": raw.get("total_steps"),
        "current_step": raw.get("current_step"),
        "created_at": _iso(raw.get("created_at")),
        "started_at": _iso(raw.get("started_at")),
        "updated_at": _iso(raw.get("updated_at")),
        "completed_at": _iso(raw.get("completed_at")),
        "cost": _cost(raw.get("cost")),
        "error": _error(raw.get("error")),
        "paused_reason": metadata.get("paused_reason"),
        "restoration_count": int(raw.get("restoration_count") or 0),
        "restoration_source": raw.get("restoration_source"),
        "last_restored_at": _iso(raw.get("last_restored_at")),
        "rollbacks": int(raw.get("rollbacks") or 0),
        "rolled_back_to": metadata.get("rolled_back_to"),
        "retries": int(raw.get("retries") or 0),
        "max_retries": int(raw.get("max_retries") or 0),
        "owner_node": raw.get("owner_node"),
        "lease_token": raw.get("lease_token"),
    }


def run_detail(store: Store, run_id: str) -> dict[str, Any]:
    """A run, its steps in execution order, checkpoints and rollbacks, for the run page.

    Raises RunNotFoundError for an unknown run.
    """
    run = Workflows(store).get_run(run_id)
    rec = run.record
    steps = [_step(run, s) for s in run.ordered_steps()]
    metadata = {k: v for k, v in rec.metadata.items()
                if k not in ("paused_reason", "rolled_back_to")}
    checkpoints = [
        {"name": c.name, "description": c.description, "tags": list(c.tags),
         "created_at": _iso(c.created_at), "steps": c.steps, "status": c.status}
        for c in run.checkpoints()
    ]
    rollbacks = []
    for n, replaced in sorted(run.discarded().items()):
        rollbacks.append({
            "rollback": n,
            "replaced_run": _REPLACED_RUN in replaced,
            "steps": [
                {"step_id": sid, "status": str(r.get("status")),
                 "attempts": int(r.get("attempts") or 0),
                 "updated_at": _iso(r.get("updated_at")), "cost": _cost(r.get("cost"))}
                for sid, r in sorted(replaced.items()) if sid != _REPLACED_RUN
            ],
        })
    stamps = [t for s in run.steps.values()
              for t in (s.created_at, s.started_at, s.completed_at, s.updated_at,
                        s.interrupted_at) if t is not None]
    stamps += [t for t in (rec.started_at, rec.created_at) if t is not None]
    stamps += [c.created_at for c in run.checkpoints()]
    ends = [t for t in (rec.completed_at, rec.updated_at) if t is not None]
    return {
        "run": _run_summary(rec.to_dict()),
        "inputs": preview(rec.inputs),
        "metadata": jsonable(metadata),
        "steps": steps,
        "checkpoints": checkpoints,
        "rollbacks": rollbacks,
        "needs_attention": [s["step_id"] for s in steps if s["status"] == "needs_attention"],
        "failed": [s["step_id"] for s in steps if s["status"] == "failure"],
        "span": {"start": _iso(min(stamps)) if stamps else None,
                 "end": _iso(max([*stamps, *ends])) if stamps or ends else None},
    }


def _step(run: Run, s: StepRecord) -> dict[str, Any]:
    output: dict[str, Any] | None = None
    if s.status == "success" or s.output is not None or s.output_key is not None:
        output = preview(_output_of(run, s))
        output["stored_apart"] = s.output_key is not None
    return {
        "step_id": s.step_id,
        "seq": s.seq,
        "status": s.status,
        "idempotent": s.idempotent,
        "attempts": s.attempts,
        "created_at": _iso(s.created_at),
        "started_at": _iso(s.started_at),
        "updated_at": _iso(s.updated_at),
        "completed_at": _iso(s.completed_at),
        "interrupted_at": _iso(s.interrupted_at),
        "fraction": s.fraction,
        "cursor": None if s.cursor is None else preview(s.cursor),
        "error": _error(s.error),
        "cost": _cost(s.cost),
        "output": output,
    }


def _output_of(run: Run, s: StepRecord) -> Any:
    return run.store.get(s.output_key) if s.output_key is not None else s.output


def step_output(store: Store, run_id: str, step_id: str) -> dict[str, Any]:
    """A step's whole output as indented JSON (cut at FULL_OUTPUT_CHARS characters).

    Raises RunNotFoundError, or KeyError for an unknown step.
    """
    run = Workflows(store).get_run(run_id)
    rec = run.steps.get(step_id)
    if rec is None:
        raise KeyError(step_id)
    text = _json_text(_output_of(run, rec), indent=2)
    return {"step_id": step_id, "text": text[:FULL_OUTPUT_CHARS], "chars": len(text),
            "truncated": len(text) > FULL_OUTPUT_CHARS}


# -- conflicts ---------------------------------------------------------------------------


def conflicts(store: Store, prefix: str = "", limit: int = CONFLICTS_LIMIT) -> dict[str, Any]:
    """Keys in conflict (as `walsync conflicts list` shows them), each sibling with its
    origin and value, the winner last; ``more`` when there are over ``limit`` keys."""
    found = list(store.conflicts(prefix, limit=limit + 1))
    return {"conflicts": [
        {"key": key, "siblings": [
            {"origin": v.version.origin, "lsn": v.version.lsn,
             "hlc_unix_ms": v.version.hlc_unix_ms, "fence": v.version.fence,
             "deleted": v.version.deleted, "value": preview(v.value),
             "dot": f"{v.version.origin}:{v.version.lsn}"}
            for v in versions
        ]}
        for key, versions in found[:limit]
    ], "more": len(found) > limit}


# -- store health ------------------------------------------------------------------------


def health(store: Store, last_verify: dict[str, Any] | None) -> dict[str, Any]:
    """Sizes, LSNs, the last checkpoint's base, the writer, and the last verify result."""
    layout = StoreLayout(store.path)
    info = store.info()
    segments = layout.list_segments()
    base_lsn: int | None
    base_at: float | None = None
    base_error = None
    try:
        base_lsn = read_base_lsn(layout)
        stamp = layout.base_dir / "BASE"
        if base_lsn and stamp.exists():
            base_at = stamp.stat().st_mtime
    except WalsyncError as exc:
        base_lsn, base_error = None, str(exc)
    alive = writer_is_alive(layout.lock_file)
    open_marker = layout.open_marker.exists()
    return {
        "path": str(Path(store.path).resolve()),
        "node_id": store.node_id,
        "applied_lsn": store.applied_lsn,
        "keys": info.keys,
        "snapshot_bytes": info.snapshot_bytes,
        "wal_bytes": info.wal_bytes,
        "wal_segments": len(segments),
        "wal_first_lsn": segments[0][0] if segments else None,
        "retain_floor": info.retain_floor,
        "last_checkpoint": {"base_lsn": base_lsn, "at_unix": base_at, "error": base_error},
        "writer": {
            "alive": alive,
            "pid": read_holder_pid(layout.lock_file) if alive else None,
            # a marker with no live writer: the last writer died with the store open
            "crashed": open_marker and not alive,
        },
        "verify": last_verify,
        "now_unix": time.time(),
    }


def verify_summary(report: VerifyReport, seconds: float) -> dict[str, Any]:
    torn = report.torn_tail
    return {
        "ok": report.ok,
        "at_unix": time.time(),
        "seconds": seconds,
        "records": report.records,
        "segments": len(report.segments),
        "wal_bytes": report.wal_bytes,
        "first_lsn": report.first_lsn,
        "last_lsn": report.last_lsn,
        "applied_lsn": report.applied_lsn,
        "damage": [{"message": d.message, "path": d.path and os.path.basename(d.path),
                    "offset": d.offset, "lsn": d.lsn} for d in report.damage],
        "torn_tail": None if torn is None else {
            "segment": torn.segment, "offset": torn.offset, "bytes_cut": torn.bytes_cut},
    }
