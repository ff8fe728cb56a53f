"""Workflow-layer cases: resuming a long run, and what one step's checkpoint costs.

    .venv/bin/python -m bench.run --only workflow_resume_1k,workflow_step_checkpoint

``workflow_resume_1k``: a run of 1,000 completed steps is built (untimed,
durability ``none``); then, several times, the store is reopened (untimed)
and ``Workflows(store).run(workflow, run_id)`` (which loads the run and its
step records) is timed. The median is the goal figure. Diagnostics: driving
the loaded run through all 1,000 steps (``with run:`` + ``run.step`` per step,
every one answered from its record, no body runs), and ``json.load`` of the
same state as one file.

``workflow_step_checkpoint``: one 200-step run, driven step by step; each step
is recorded twice, in alternating order: by walsync (``run.begin`` … timed
``ctx.complete(output)``: one durable commit of the step, run and index keys)
and by a naive checkpointer that rewrites the whole run state (run + every
step so far) as JSON to a temp file, fsyncs it, renames it over the old one
and fsyncs the directory. The goal compares the medians per step.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

from .baselines import save_json_atomically
from .cases import check, fmt, ratio
from .common import median, percentile, us
from .registry import CaseResult, Context, case, describe

WORKFLOW = "bench"
RESUME_STEPS = 1000


def _step_output(i: int) -> dict[str, Any]:
    """A small, workflow-like step output (~200 bytes)."""
    return {"step": i, "rows": 128 + i % 17, "digest": f"{i:08x}" * 8,
            "files": [f"part-{i:05d}-{j}.parquet" for j in range(2)]}


def _skip(ctx: Context) -> dict[str, str]:
    return {"walsync": f"skipped: engine did not import ({ctx.engine_error})"}


# ---------------------------------------------------------------- resume


def _build_completed_run(path: Path, steps: int) -> None:
    from walsync.engine import Store
    from walsync.engine.workflow import Workflows

    with Store.open(path, durability="none") as store:
        run = Workflows(store).run(WORKFLOW, "resume-1k", total_steps=steps)
        with run:
            for i in range(steps):
                run.step(f"s{i:04d}", _step_output, i)
        if run.status != "completed":
            raise RuntimeError(f"the run ended {run.status}, not completed")


@case("workflow_resume_1k", goal="Workflows.run + load of a 1,000-step completed run <= 20 ms "
      "(median)")
def workflow_resume_1k(ctx: Context) -> CaseResult:
    loads = ctx.pick(15, 5)
    f: dict[str, Any] = {"steps": RESUME_STEPS, "loads": loads}
    if not ctx.engine_ok:
        return CaseResult(f, checks={"<= 20 ms": None}, errors=_skip(ctx))
    from walsync.engine import Store
    from walsync.engine.workflow import Workflows

    errors: dict[str, str] = {}
    path = ctx.subdir("walsync")
    load_ms: list[float] = []
    drive_ms: list[float] = []
    bodies = 0

    def body(i: int) -> dict[str, Any]:
        nonlocal bodies
        bodies += 1
        return _step_output(i)

    try:
        _build_completed_run(path, RESUME_STEPS)
        for _ in range(loads):
            with Store.open(path) as store:
                gc.collect()
                t0 = time.perf_counter_ns()
                run = Workflows(store).run(WORKFLOW, "resume-1k")
                load_ms.append((time.perf_counter_ns() - t0) / 1e6)
                if len(run.steps) != RESUME_STEPS:
                    raise RuntimeError(f"loaded {len(run.steps)} steps")
                t0 = time.perf_counter_ns()
                with run:
                    for i in range(RESUME_STEPS):
                        run.step(f"s{i:04d}", body, i)
                drive_ms.append((time.perf_counter_ns() - t0) / 1e6)
        if bodies:
            raise RuntimeError(f"{bodies} step bodies ran on resume")
    except Exception as exc:  # noqa: BLE001 - reported in the case's JSON line
        errors["walsync"] = describe(exc)

    # Reference: the same state as one JSON file, loaded.
    state = {"run": {"run_id": "resume-1k", "workflow": WORKFLOW, "status": "completed"},
             "steps": {f"s{i:04d}": {"status": "success", "attempts": 1,
                                     "output": _step_output(i)} for i in range(RESUME_STEPS)}}
    jpath = ctx.subdir("json") / "state.json"
    jpath.write_text(json.dumps(state))
    json_ms = []
    for _ in range(loads):
        t0 = time.perf_counter_ns()
        with open(jpath, encoding="utf-8") as fh:
            json.load(fh)
        json_ms.append((time.perf_counter_ns() - t0) / 1e6)

    w = round(median(load_ms), 2) if load_ms else None
    f["walsync_load_ms"] = w
    f["walsync_load_max_ms"] = round(max(load_ms), 2) if load_ms else None
    f["walsync_drive_1k_ms"] = round(median(drive_ms), 2) if drive_ms else None
    f["walsync_bodies_run"] = bodies
    f["json_load_ms"] = round(median(json_ms), 2)
    f["json_state_bytes"] = jpath.stat().st_size
    f["loadavg_1m"] = round(os.getloadavg()[0], 2)  # other processes inflate the figures
    return CaseResult(
        f,
        checks={"<= 20 ms": check(w, 20.0)},
        headline=(f"load {fmt(w)} ms, drive {fmt(f['walsync_drive_1k_ms'])} ms",
                  f"json.load {fmt(f['json_load_ms'])} ms"),
        errors=errors,
    )


# ---------------------------------------------------------------- per-step checkpoint


class NaiveJsonRun:
    """Rewrites the whole run state after every step: tmp + fsync + rename + dir fsync."""

    def __init__(self, directory: Path, steps: int) -> None:
        self.dir = directory
        self.target = directory / "run.json"
        self.tmp = directory / "run.json.tmp"
        self.state: dict[str, Any] = {
            "run": {"run_id": "ckpt", "workflow": WORKFLOW, "status": "running",
                    "total_steps": steps, "steps_done": 0, "progress": 0.0,
                    "current_step": None, "cost": {}, "metadata": {}},
            "steps": [],
        }

    def record(self, i: int, step_id: str, output: Any) -> None:
        """Add the finished step to the state (untimed part)."""
        now = time.time()
        self.state["steps"].append({
            "step_id": step_id, "status": "success", "seq": i, "idempotent": True,
            "inputs": None, "output": output, "error": None, "attempts": 1,
            "created_at": now, "started_at": now, "updated_at": now, "completed_at": now,
            "fraction": 1.0, "cursor": None, "cost": {},
        })
        run = self.state["run"]
        run["steps_done"] = i + 1
        run["progress"] = 100.0 * (i + 1) / run["total_steps"]
        run["current_step"] = step_id

    def checkpoint(self) -> None:
        save_json_atomically(self.state, self.tmp, self.target, self.dir)


@case("workflow_step_checkpoint",
      goal="a step's complete() commit (durable) >= 3x faster than rewriting the run state as "
      "JSON (tmp+fsync+rename+dir fsync), 200-step run, median per step")
def workflow_step_checkpoint(ctx: Context) -> CaseResult:
    steps = ctx.pick(200, 50)
    f: dict[str, Any] = {"steps": steps}
    if not ctx.engine_ok:
        return CaseResult(f, checks={">= 3x faster": None}, errors=_skip(ctx))
    from walsync.engine import Store
    from walsync.engine.workflow import Workflows

    errors: dict[str, str] = {}
    naive = NaiveJsonRun(ctx.subdir("json"), steps)
    complete_ns: list[int] = []
    step_ns: list[int] = []
    json_ns: list[int] = []
    clock = time.perf_counter_ns
    with contextlib.ExitStack() as stack:
        try:
            store = stack.enter_context(Store.open(ctx.subdir("walsync")))
            run = Workflows(store).run(WORKFLOW, "ckpt", total_steps=steps)
            run.start()
        except Exception as exc:  # noqa: BLE001 - reported in the case's JSON line
            errors["walsync"] = describe(exc)
            run = None
        gc.collect()
        for i in range(steps):
            sid = f"s{i:04d}"
            output = _step_output(i)
            order = ("walsync", "json") if i % 2 == 0 else ("json", "walsync")
            for who in order:
                if who == "json":
                    naive.record(i, sid, output)
                    t0 = clock()
                    naive.checkpoint()
                    json_ns.append(clock() - t0)
                elif run is not None and "walsync" not in errors:
                    try:
                        s0 = clock()
                        with run.begin(sid) as step:
                            t0 = clock()
                            step.complete(output)
                            t1 = clock()
                        step_ns.append(clock() - s0)
                        complete_ns.append(t1 - t0)
                    except Exception as exc:  # noqa: BLE001 - reported in the case's JSON line
                        errors["walsync"] = describe(exc)
        if run is not None and "walsync" not in errors:
            run.complete()
    f["walsync_complete_p50_us"] = us(percentile(complete_ns, 50)) if complete_ns else None
    f["walsync_complete_p99_us"] = us(percentile(complete_ns, 99)) if complete_ns else None
    f["walsync_step_p50_us"] = us(percentile(step_ns, 50)) if step_ns else None
    f["json_rewrite_p50_us"] = us(percentile(json_ns, 50))
    f["json_rewrite_p99_us"] = us(percentile(json_ns, 99))
    f["json_final_state_bytes"] = naive.target.stat().st_size
    f["loadavg_1m"] = round(os.getloadavg()[0], 2)
    f["speedup_p50"] = ratio(f["json_rewrite_p50_us"], f["walsync_complete_p50_us"])
    f["speedup_mean"] = (round(sum(json_ns) / sum(complete_ns), 3)
                         if complete_ns and len(complete_ns) == len(json_ns) else None)
    #: the whole step (begin's 'running' commit + complete's commit) against one rewrite
    f["speedup_whole_step_p50"] = ratio(f["json_rewrite_p50_us"], f["walsync_step_p50_us"])
    return CaseResult(
        f,
        checks={">= 3x faster": check(f["speedup_p50"], 3.0, at_least=True)},
        headline=(f"complete() p50 {fmt(f['walsync_complete_p50_us'])} us "
                  f"({fmt(f['speedup_p50'])}x)",
                  f"json rewrite p50 {fmt(f['json_rewrite_p50_us'])} us"),
        errors=errors,
    )
