"""Run walsync and its baselines on one disk; print one JSON line per case.

    .venv/bin/python -m bench.run                 # full run, ~2-3 minutes
    .venv/bin/python -m bench.run --quick         # smoke test, < 30 s
    .venv/bin/python -m bench.run --only commit_1k --only get_1k
    .venv/bin/python -m bench.run --dir /mnt/other-disk/tmp

stdout: JSON lines (the first, ``"case": "_env"``, says which filesystem was
measured). stderr: progress and a summary table.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import aio_cases as _aio_cases  # noqa: F401 - registers its cases
from . import cases as _cases  # noqa: F401 - registers the cases
from . import langgraph_cases as _langgraph_cases  # noqa: F401 - registers its cases
from . import pull_cases as _pull_cases  # noqa: F401 - registers its cases
from . import push_concurrency_cases as _push_concurrency_cases  # noqa: F401 - registers its cases
from . import sync_cases as _sync_cases  # noqa: F401 - registers its cases
from . import workflow_cases as _workflow_cases  # noqa: F401 - registers its cases
from .common import fs_info, machine_info
from .registry import CASES, CaseResult, Context, describe
from .walsync_cases import load_engine

DEFAULT_PARENT = Path(__file__).resolve().parent / "results"  # git-ignored


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test (< 30 s)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this case (repeatable, or comma-separated); see --list")
    p.add_argument("--dir", type=Path, default=None,
                   help=f"where temporary files go (default: a new dir under {DEFAULT_PARENT})")
    p.add_argument("--keep", action="store_true", help="do not delete the temporary files")
    p.add_argument("--list", action="store_true", help="list the cases and their goals")
    p.add_argument("--case-timeout", type=float, default=300.0, metavar="S",
                   help="dump all thread stacks and exit if one case runs longer (default 300)")
    return p.parse_args(argv)


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line, default=str), flush=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def met_of(result: CaseResult, walsync_ran: bool) -> bool | None:
    if not result.checks or not walsync_ran:
        return None
    values = list(result.checks.values())
    if any(v is None for v in values):
        return None
    return all(values)


def summary(rows: list[tuple[str, CaseResult | None, bool | None, float]]) -> str:
    table = [("case", "met", "walsync", "baselines", "s")]
    notes: list[str] = []
    for name, result, met, seconds in rows:
        mark = {True: "yes", False: "NO", None: "-"}[met]
        if result is None:
            table.append((name, "ERR", "-", "case crashed (see its JSON line)", f"{seconds:.0f}"))
            continue
        table.append((name, mark, result.headline[0], result.headline[1], f"{seconds:.0f}"))
        notes.extend(f"  {name}: missed '{goal}'" for goal, ok in result.checks.items()
                     if ok is False)
        notes.extend(f"  {name}: {who} -> {why}" for who, why in result.errors.items()
                     if not why.startswith("skipped:"))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + (["", "notes:", *notes] if notes else []))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for c in CASES.values():
            print(f"{c.name:22} {c.goal}")
        return 0
    wanted = [n for item in args.only for n in item.split(",") if n]
    unknown = [n for n in wanted if n not in CASES]
    if unknown:
        log(f"unknown case(s): {', '.join(unknown)}; known: {', '.join(CASES)}")
        return 2
    selected = [c for c in CASES.values() if not wanted or c.name in wanted]

    if args.dir is None:
        DEFAULT_PARENT.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="run-", dir=DEFAULT_PARENT))
    else:
        args.dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="walsync-bench-", dir=args.dir))
    fs = fs_info(work)
    engine, engine_error = load_engine()
    env: dict[str, Any] = {"case": "_env", "quick": args.quick, **fs.as_dict(),
                           **machine_info(), "engine": "ok" if engine else "skipped",
                           "engine_error": engine_error}
    if fs.is_memory:
        env["fs_warning"] = f"{fs.fstype} is memory-backed: fsync costs nothing here"
    emit(env)
    log(f"measuring on {fs.fstype} ({fs.device} at {fs.mount_point}), dir {work}")
    if fs.is_memory:
        log(f"WARNING: {env['fs_warning']}; pass --dir on a real disk")
    if engine is None:
        log(f"walsync cases skipped: the engine did not import ({engine_error}); "
            "running the baselines only")

    ctx = Context(work=work, quick=args.quick, engine_ok=engine is not None,
                  engine_error=engine_error)
    rows: list[tuple[str, CaseResult | None, bool | None, float]] = []
    started = time.perf_counter()
    try:
        for c in selected:
            log(f"-- {c.name}: {c.goal}")
            faulthandler.dump_traceback_later(args.case_timeout, exit=True)
            t0 = time.perf_counter()
            result: CaseResult | None = None
            try:
                result = c.func(ctx)
            except Exception as exc:  # noqa: BLE001 - one broken case must not stop the run
                seconds = time.perf_counter() - t0
                emit({"case": c.name, "goal": c.goal, "met": None, "error": describe(exc)})
                rows.append((c.name, None, None, seconds))
                continue
            finally:
                faulthandler.cancel_dump_traceback_later()
            seconds = time.perf_counter() - t0
            walsync_ran = ctx.engine_ok and not any(k.startswith("walsync")
                                                    for k in result.errors)
            met = met_of(result, walsync_ran)
            line: dict[str, Any] = {"case": c.name, **result.fields, "goal": c.goal, "met": met}
            if result.checks:
                line["checks"] = result.checks
            if result.errors:
                line["errors"] = result.errors
            if not ctx.engine_ok:
                line["walsync_skipped"] = f"engine did not import: {engine_error}"
            line["case_s"] = round(seconds, 1)
            emit(line)
            rows.append((c.name, result, met, seconds))
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - started
    log("")
    log(summary(rows))
    log(f"\n{len(rows)} case(s) in {total:.0f} s on {fs.fstype} ({fs.device})"
        + ("" if engine else "; walsync skipped (engine did not import)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
