"""The supervisor's recovery protocol: take a run up again after a restart.

Why a protocol rather than ``Workflows.run``: a supervisor restarting does not
know whether the state it finds is sound. No state: start fresh, and say so. A
state that fails validation: roll back to the newest checkpoint that passes;
if none does, start fresh, keeping the invalid state under the run's
``discarded`` keys. A valid state: take it up. Recoveries are counted in the
run record, with time and source (its ``restoration_*`` fields, named so when
they were first stored); pending questions (``metadata["pending_questions"]``)
and waiting steps are handed back to the caller.

(Restore, in walsync, is the sync layer's rebuilding of a lost host's store
from the server: ``walsync restore``. Rollback is returning a run to a named
checkpoint: engine/workflow/rollback.py.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import rollback
from .records import RunRecord, StepStatus, utcnow

if TYPE_CHECKING:
    from .leases import LeaseLike
    from .run import Run, RunState
    from .workflows import Workflows

__all__ = ["Recovery", "Validator", "recover"]

#: a caller's check of a run state: None/True (valid), False, a list of problems, or raises
Validator = Callable[["RunState"], Any]


@dataclass(frozen=True)
class Recovery:
    """What the recovery protocol did, and what the caller must pick up."""

    outcome: str  # "fresh" | "checkpoint" | "recovered"
    run: Run
    reason: str
    pending_questions: list[Any] = field(default_factory=list)
    waiting_steps: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def recover(
    wf: Workflows,
    run_id: str,
    workflow: str,
    *,
    validator: Validator | None = None,
    source: str = "restart",
    inputs: Any = None,
    lease: tuple[str, int] | LeaseLike | None = None,
) -> Recovery:
    """See ``Workflows.recover``."""
    run = wf._load(run_id)
    if run is None:
        fresh = wf.run(workflow, run_id, inputs=inputs, lease=lease)
        return Recovery("fresh", fresh, "no saved state")
    if lease is not None:
        run.set_lease(lease)
    problems = wf.validate(run.state(), validator)
    outcome, reason = "recovered", "state is valid"
    if problems:
        for info in reversed(run.checkpoints()):
            cp_state = rollback.checkpoint_state(run, info.name)
            if not wf.validate(cp_state, validator):
                run.rollback(info.name)
                outcome, reason = "checkpoint", f"state invalid; rolled back to {info.name!r}"
                break
        else:
            now = utcnow()
            fresh = rollback.discard_all(run, RunRecord(
                run_id=run_id, workflow=workflow, schema_version=wf.schema_version,
                inputs=inputs, created_at=now, updated_at=now,
                owner_node=run.record.owner_node, lease_token=run.record.lease_token,
            ))
            return Recovery("fresh", fresh, "state invalid and no valid checkpoint",
                            problems=problems)
    run.record.restoration_count += 1
    run.record.last_restored_at = utcnow()
    run.record.restoration_source = source
    run._commit_run()
    waiting = [
        s.step_id for s in run.ordered_steps()
        if s.status in (StepStatus.PENDING, StepStatus.RUNNING, StepStatus.NEEDS_ATTENTION)
    ]
    questions = list(run.record.metadata.get("pending_questions", []))
    return Recovery(outcome, run, reason, questions, waiting, problems)
