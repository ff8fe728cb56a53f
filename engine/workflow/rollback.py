"""Named checkpoints of a run, rollback to one, and what a rollback discarded.

Why rollback keeps what it replaces: a rollback is the orchestrator's
decision, and the steps it undoes may have had effects outside (an email
sent); the replaced step records stay readable under the run's ``discarded``
keys (``Run.discarded``) until retention removes the run. The summed cost is
never rolled back: it is money spent. Each function here is one commit.
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointNotFoundError
from ..events import RunCheckpointEvent
from . import keys
from .records import (
    RunRecord,
    RunStatus,
    checked_checkpoint,
    checked_run,
    checked_step,
    utcnow,
)

if TYPE_CHECKING:
    from .run import Run, RunState

__all__ = [
    "CheckpointInfo",
    "RollbackReport",
    "checkpoint",
    "checkpoint_state",
    "checkpoints",
    "discard_all",
    "discarded",
    "rollback",
]


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    description: str
    tags: list[str]
    created_at: dt.datetime
    steps: int
    status: str


@dataclass(frozen=True)
class RollbackReport:
    checkpoint: str
    #: the rollback's number (its discarded records are kept under it)
    rollback: int
    #: steps whose records the rollback replaced or removed (kept, see Run.discarded)
    discarded_steps: list[str]
    #: steps whose records the rollback put back as the checkpoint holds them
    reverted_steps: list[str]

    @property
    def restored_steps(self) -> list[str]:
        """Deprecated name of ``reverted_steps``."""
        warnings.warn("RollbackReport.restored_steps is now reverted_steps",
                      DeprecationWarning, stacklevel=2)
        return self.reverted_steps


def checkpoint(run: Run, name: str, description: str = "", tags: Sequence[str] = ()) -> None:
    """Record the run and its steps as they are now, under ``name``."""
    keys.check_id("checkpoint name", name)
    with run._batch() as b:
        b.put(keys.checkpoint(run.run_id, name), {
            "name": name, "description": description, "tags": list(tags),
            "created_at": utcnow(), **run.state(),
        })
        b.notes.append(RunCheckpointEvent(key=keys.checkpoint(run.run_id, name),
                                          run_id=run.run_id, name=name, action="created"))


def checkpoints(run: Run) -> list[CheckpointInfo]:
    """Named checkpoints, oldest first."""
    out = []
    for key, value in run.store.scan(run._grammar.checkpoints(run.run_id)):
        cp = checked_checkpoint(key, value)
        out.append(CheckpointInfo(cp["name"], cp["description"], list(cp["tags"]),
                                  cp["created_at"], len(cp["steps"]), cp["run"]["status"]))
    return sorted(out, key=lambda c: c.created_at)


def checkpoint_state(run: Run, name: str) -> RunState:
    """The run and step records checkpoint ``name`` holds, upgraded to the current
    workflow-state schema (CorruptionError if they are not records)."""
    key = run._grammar.checkpoint(run.run_id, name)
    value = run.store.get(key)
    if value is None:
        raise CheckpointNotFoundError(f"run {run.run_id!r} has no checkpoint {name!r}")
    cp = checked_checkpoint(key, value)
    return run.wf.migrate({"run": cp["run"], "steps": cp["steps"]})


def rollback(run: Run, name: str) -> RollbackReport:
    """Return the run to checkpoint ``name``; what it replaces stays readable.

    Step records that the rollback changes or removes are kept under the
    run's ``discarded/<n>/`` keys (see ``discarded``) until retention removes
    the run. The summed cost is not rolled back: it is money spent.
    """
    run._moved()  # the checkpoint's records are read as they are kept in the namespace
    state = checkpoint_state(run, name)
    key = keys.checkpoint(run.run_id, name)
    cp_record = checked_run(key, state["run"], run.run_id)
    cp_steps = {sid: checked_step(key, d, sid) for sid, d in state["steps"].items()}
    n = run.record.rollbacks + 1
    prefix = keys.discarded(run.run_id, n)
    discarded_steps, reverted = [], []
    with run._batch() as b:
        for sid, cur in run.steps.items():
            old = cp_steps.get(sid)
            if old is None or old.to_dict() != cur.to_dict():
                b.put(prefix + sid, cur.to_dict())
                discarded_steps.append(sid)
            if old is None:
                b.delete(keys.step(run.run_id, sid))
        for sid, old in cp_steps.items():
            if sid not in run.steps or old.to_dict() != run.steps[sid].to_dict():
                b.put(keys.step(run.run_id, sid), old.to_dict())
                reverted.append(sid)
        current = run.record
        record = cp_record
        record.cost = current.cost
        # the lease is the one driving the run now, not the checkpoint's
        record.owner_node, record.lease_token = current.owner_node, current.lease_token
        (record.restoration_count, record.last_restored_at, record.restoration_source) = (
            current.restoration_count, current.last_restored_at, current.restoration_source)
        record.rollbacks = n
        if record.status not in (RunStatus.PENDING,):
            record.status = RunStatus.PAUSED.value
        record.metadata["rolled_back_to"] = name
        run.record = record
        run.steps = cp_steps
        b.notes.append(RunCheckpointEvent(key=keys.checkpoint(run.run_id, name),
                                          run_id=run.run_id, name=name,
                                          action="rolled_back"))
        run._write_run(b)
    run._version_from(b)
    return RollbackReport(name, n, discarded_steps, reverted)


def discarded(run: Run) -> dict[int, dict[str, dict[str, Any]]]:
    """Step records replaced by each rollback: ``{rollback n: {step_id: record}}``."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    base = run._grammar.discarded_all(run.run_id)
    for key, rec in run.store.scan(base):
        n, _, sid = key[len(base):].partition("/")
        out.setdefault(int(n), {})[sid] = rec
    return out


def discard_all(run: Run, fresh: RunRecord) -> Run:
    """Keep an invalid state under discarded/ and replace it by ``fresh`` (recovery).

    The fresh run inherits the rollback count, so its own rollbacks and
    outputs never land on the keys of the state kept here. One commit.
    """
    from .run import Run

    run._moved()  # the replacement expects the record's version in the namespace
    n = run.record.rollbacks + 1
    prefix = keys.discarded(run.run_id, n)
    fresh.rollbacks = n
    replacement = Run(run.wf, fresh, {})
    replacement._version = run._version
    replacement._seen_status = run._seen_status
    with run._batch() as b:
        b.put(prefix + "__run__", run.record.to_dict())
        for sid, rec in run.steps.items():
            b.put(prefix + sid, rec.to_dict())
            b.delete(keys.step(run.run_id, sid))
        replacement._write_run(b)
    replacement._version_from(b)
    return replacement
