"""Workflow runs and their named checkpoints: `walsync runs` and `walsync checkpoints`."""

from __future__ import annotations

from collections.abc import Iterator

import click

from walsync.engine.workflow import CheckpointInfo, Cost, RunRecord, Workflows

from .options import KEY, open_read, open_write, store_option
from .output import Output, json_option

__all__ = ["COMMANDS"]


@click.group()
def runs() -> None:
    """Workflow runs: list, show, resumable."""


def _run_line(rec: RunRecord) -> str:
    return (f"{rec.run_id:<28} {rec.workflow:<16} {rec.status:<10} "
            f"{rec.progress:5.1f}%  steps {rec.steps_done:<4} ${Cost.from_dict(rec.cost).usd:.4f}"
            f"  updated {rec.updated_at:%Y-%m-%d %H:%M:%S}")


@runs.command("list")
@store_option
@click.option("--status", multiple=True, help="Only runs with this status (repeatable).")
@click.option("--workflow", help="Only runs of this workflow.")
@json_option
def runs_list(store_path: str, status: tuple[str, ...], workflow: str | None,
              out: Output) -> None:
    """List runs (one JSON object per line with --json)."""
    with open_read(store_path) as store:
        records = Workflows(store).list_runs(status=status or None, workflow=workflow)
    wanted = " ".join([*(f"--status {s}" for s in status)]
                      + ([f"--workflow {workflow}"] if workflow else []))
    out.rows(records, _run_line, empty=f"no runs in {store_path}"
             + (f" matching {wanted}" if wanted else ""))


@runs.command("resumable")
@store_option
@json_option
def runs_resumable(store_path: str, out: Output) -> None:
    """Runs worth resuming: running, paused, or failed with retries left."""
    with open_read(store_path) as store:
        records = Workflows(store).resumable()
    out.rows(records, _run_line, empty=f"no resumable runs in {store_path}")


@runs.command("show")
@store_option
@click.argument("run_id", type=KEY)
@json_option
def runs_show(store_path: str, run_id: str, out: Output) -> None:
    """Show a run and its steps in execution order."""
    with open_read(store_path) as store:
        run = Workflows(store).get_run(run_id)
        steps = run.ordered_steps()
    rec = run.record

    def human() -> Iterator[str]:
        yield (f"run {rec.run_id}  workflow {rec.workflow} v{rec.workflow_version}  "
               f"{rec.status}  {rec.progress:.0f}%  cost ${Cost.from_dict(rec.cost).usd:.4f}")
        if rec.error:
            yield f"error: {rec.error.get('type')}: {rec.error.get('message')}"
        for s in steps:
            extra = (f"  cursor={s.cursor!r}" if s.status != "success" and s.cursor is not None
                     else "")
            yield f"  {s.seq:>4}  {s.step_id:<28} {s.status:<16} attempts {s.attempts}{extra}"

    out.result({"run": rec, "steps": steps}, human)


@click.group()
def checkpoints() -> None:
    """Named checkpoints of a run: list, rollback."""


@checkpoints.command("list")
@store_option
@click.argument("run_id", type=KEY)
@json_option
def checkpoints_list(store_path: str, run_id: str, out: Output) -> None:
    """List RUN_ID's checkpoints, oldest first."""
    with open_read(store_path) as store:
        infos = Workflows(store).get_run(run_id).checkpoints()

    def line(info: CheckpointInfo) -> str:
        return (f"{info.name:<24} {info.created_at:%Y-%m-%d %H:%M:%S}  {info.steps} steps  "
                f"{info.status:<10} {','.join(info.tags)}  {info.description}")

    out.rows(infos, line, empty=f"run {run_id} has no checkpoints")


@checkpoints.command("rollback")
@store_option
@click.argument("run_id", type=KEY)
@click.argument("name")
@json_option
def checkpoints_rollback(store_path: str, run_id: str, name: str, out: Output) -> None:
    """Roll RUN_ID back to checkpoint NAME (what it replaces stays retrievable)."""
    with open_write(store_path) as store:
        report = Workflows(store).get_run(run_id).rollback(name)
    out.result(report, lambda: f"run {run_id} rolled back to {name!r} (rollback "
                               f"#{report.rollback}); replaced steps kept: "
                               f"{', '.join(report.discarded_steps) or 'none'}")


COMMANDS = [runs, checkpoints]
