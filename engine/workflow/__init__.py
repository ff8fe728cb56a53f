"""The workflow layer: runs and steps on a store, checkpointed after every step and
resumed without running completed steps again.

The public face; the modules behind it:

- ``keys``: how run, step, checkpoint and output keys are spelled and parsed
  (the one place; its SQL twin is checked against it);
- ``records``: the run and step records, and the checks a stored value passes
  before it becomes one;
- ``workflows``: ``Workflows``: create, find, list, upgrade and retire runs;
- ``run``: ``Run``, one run driven with ``with run:``;
- ``step``: the ``@step`` decorator, ``StepContext``, ``current_step``;
- ``aio``: the awaitable forms: ``AsyncRun`` (``Workflows.arun``), ``AsyncStepContext``;
- ``rollback``: named checkpoints, rollback, what a rollback discarded;
- ``recovery``: the supervisor's recovery protocol (``Workflows.recover``);
- ``leases``: this host's own leases on runs;
- ``legacy``: runs an older walsync wrote outside the reserved namespace.
- ``export``: one run in an export file (``export_run``; the format is engine/export.py).

The workflow layer is built on the engine's public Store API and writes its
keys through the store's internal door (they live in the reserved namespace);
the engine never imports it.
"""

from . import keys
from .aio import AsyncRun, AsyncStepContext, RunOpener, current_async_step
from .export import export_run, run_scope
from .leases import LeaseLike, drop_lease, held_lease, hold_lease
from .records import (
    RUN_STATUSES,
    STEP_STATUSES,
    Cost,
    RunRecord,
    RunStatus,
    StepRecord,
    StepStatus,
    describe_error,
    utcnow,
)
from .recovery import Recovery, Validator
from .rollback import CheckpointInfo, RollbackReport
from .run import Run, RunState
from .step import StepContext, current_run, current_step, step
from .workflows import Migration, RetentionPolicy, RetentionReport, Workflows

__all__ = [
    "RUN_STATUSES",
    "STEP_STATUSES",
    "AsyncRun",
    "AsyncStepContext",
    "CheckpointInfo",
    "Cost",
    "LeaseLike",
    "Migration",
    "Recovery",
    "RetentionPolicy",
    "RetentionReport",
    "RollbackReport",
    "Run",
    "RunOpener",
    "RunRecord",
    "RunState",
    "RunStatus",
    "StepContext",
    "StepRecord",
    "StepStatus",
    "Validator",
    "Workflows",
    "current_async_step",
    "current_run",
    "current_step",
    "describe_error",
    "drop_lease",
    "export_run",
    "held_lease",
    "hold_lease",
    "keys",
    "run_scope",
    "step",
    "utcnow",
]
