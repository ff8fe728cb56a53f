"""Runs and steps on a store: checkpoint after every step, resume without re-running.

An orchestrator adopts it in a few lines::

    wf = Workflows(Store.open("state"))
    with wf.run("nightly-etl", run_id="2026-11-23") as run:
        rows = run.step("fetch", fetch, day)      # after a crash: the recorded output
        clean = run.step("transform", transform, rows)
        run.step("charge", charge_card, clean, idempotent=False)

Resume rules (SPEC 3.2): a ``success`` step never runs again and returns its
recorded output; ``failure``, ``cancelled``, ``skipped`` and ``pending`` steps
run (again); a step found ``running`` when a run is started was interrupted
by a crash: it runs again from its last cursor if it is idempotent, and
becomes ``needs_attention`` (and raises StepNeedsAttentionError) if it is not,
until the orchestrator resolves it.

What is durable when a call returns: every state change is one commit of the
store (durable per the store's durability); a step's completion, the run's
summary (status, progress, current step, summed cost) and the run index move
in that one commit.

Threads: a Run is driven by one thread at a time. Two drivers of one run in
the same store are caught by optimistic checks on the run record
(ConflictError); across hosts, leases decide who drives.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import datetime as dt
import functools
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

import cbor2

from .errors import (
    CheckpointNotFoundError,
    InvalidValueError,
    RunNotFoundError,
    SchemaVersionError,
    StepNeedsAttentionError,
    WorkflowError,
)
from .events import Event, RunCheckpointEvent, RunEvent, StepEvent
from .runs import (
    RUN_STATUSES,
    STEP_STATUSES,
    Cost,
    RunRecord,
    RunStatus,
    StepRecord,
    StepStatus,
    describe_error,
    keys,
    utcnow,
)
from .store import ANY, Batch, Put, Store
from .versions import Version

__all__ = [
    "CheckpointInfo",
    "Restoration",
    "RetentionPolicy",
    "RetentionReport",
    "RollbackReport",
    "Run",
    "StepContext",
    "Workflows",
    "current_run",
    "current_step",
    "step",
]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

#: a state for migrations and validators: {"run": run dict, "steps": {id: step dict}}
RunState = dict[str, Any]
Migration = Callable[[RunState], RunState]
Validator = Callable[[RunState], Any]

_current_run: contextvars.ContextVar[Run | None] = contextvars.ContextVar(
    "walsync_run", default=None
)
_current_step: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar(
    "walsync_step", default=None
)

_RERUN = frozenset({
    StepStatus.PENDING, StepStatus.FAILURE, StepStatus.CANCELLED, StepStatus.SKIPPED,
})
_TERMINAL_RUN = frozenset({RunStatus.COMPLETED, RunStatus.CANCELLED})


def current_run() -> Run:
    """The run the calling code is inside (``with run:``)."""
    run = _current_run.get()
    if run is None:
        raise WorkflowError("no run is active here: call steps inside `with workflows.run(...)`")
    return run


def current_step() -> StepContext:
    """The step the calling code is inside, for progress() and add_cost()."""
    ctx = _current_step.get()
    if ctx is None:
        raise WorkflowError("no step is active here: call this from inside a step's body")
    return ctx


@overload
def step(fn: F, *, name: str | None = None, idempotent: bool = True) -> F: ...


@overload
def step(
    fn: None = None, *, name: str | None = None, idempotent: bool = True
) -> Callable[[F], F]: ...


def step(
    fn: F | None = None, *, name: str | None = None, idempotent: bool = True
) -> Any:
    """Decorate a function so each call inside a run is a recorded step.

    The step id is ``name`` (default: the function's qualified name), with
    ``#2``, ``#3``… for later calls in the same run, so a loop's iterations are
    distinct steps as long as the orchestrator calls them in the same order.
    """

    def decorate(f: F) -> F:
        base = name or f.__qualname__

        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            run = current_run()
            return run.step(run.next_step_id(base), f, *args, idempotent=idempotent, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate(fn) if fn is not None else decorate


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
    rollback: int
    discarded_steps: list[str]
    restored_steps: list[str]


@dataclass(frozen=True)
class Restoration:
    """What the restoration protocol did, and what the caller must pick up."""

    outcome: str  # "fresh" | "checkpoint" | "restored"
    run: Run
    reason: str
    pending_questions: list[Any] = field(default_factory=list)
    waiting_steps: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RetentionPolicy:
    max_age_seconds: float
    statuses: tuple[str, ...] = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class RetentionReport:
    runs_removed: list[str]
    keys_removed: int


class Workflows:
    """The workflow layer over one store.

    ``migrations[i]`` upgrades a run state from schema version ``i + 1`` to
    ``i + 2``; the current schema version is ``len(migrations) + 1``. States
    are upgraded when loaded, and written back upgraded.
    """

    def __init__(
        self,
        store: Store,
        *,
        migrations: Sequence[Migration] = (),
        inline_output_bytes: int = 16 * 1024,
    ) -> None:
        self.store = store
        self.migrations = list(migrations)
        self.schema_version = len(self.migrations) + 1
        self.inline_output_bytes = inline_output_bytes

    # -- runs ----------------------------------------------------------------

    def run(
        self,
        workflow: str,
        run_id: str | None = None,
        *,
        inputs: Any = None,
        version: str | int = 1,
        metadata: dict[str, Any] | None = None,
        total_steps: int | None = None,
        max_retries: int = 0,
        lease: tuple[str, int] | None = None,
    ) -> Run:
        """The run ``run_id`` if it exists (to resume it), else a new pending run.

        ``lease`` is ``(holder, token)`` of the run's lease (sync.lease), taken
        before this call: a new run is created with the token already on its
        first write, an existing one gets it (``set_lease``). A run created
        without it and leased afterwards has an unfenced first write, which the
        server refuses if it arrives after the lease was taken.
        """
        if run_id is not None:
            existing = self._load(run_id)
            if existing is not None:
                if existing.record.workflow != workflow:
                    raise WorkflowError(
                        f"run {run_id!r} belongs to workflow {existing.record.workflow!r}, "
                        f"not {workflow!r}"
                    )
                if lease is not None and \
                        (existing.record.owner_node, existing.fence) != tuple(lease):
                    existing.set_lease(*lease)
                return existing
        run_id = run_id or _new_run_id()
        _check_id("run id", run_id)
        now = utcnow()
        record = RunRecord(
            run_id=run_id, workflow=workflow, workflow_version=version,
            schema_version=self.schema_version, inputs=inputs, created_at=now, updated_at=now,
            metadata=dict(metadata or {}), total_steps=total_steps, max_retries=max_retries,
        )
        if lease is not None:
            record.owner_node, record.lease_token = lease
        run = Run(self, record, {})
        run._seen_status = None  # its first commit creates it
        with run._batch() as b:
            run._write_run(b, expect=None)
        run._version_from(b)
        return run

    def get_run(self, run_id: str) -> Run:
        run = self._load(run_id)
        if run is None:
            raise RunNotFoundError(f"no run {run_id!r} in store {self.store.path}")
        return run

    def list_runs(
        self, *, status: str | Sequence[str] | None = None, workflow: str | None = None
    ) -> list[RunRecord]:
        wanted = {status} if isinstance(status, str) else set(status or ())
        out = []
        for key, entry in self.store.scan(keys.INDEX):
            if wanted and entry["status"] not in wanted:
                continue
            if workflow is not None and entry["workflow"] != workflow:
                continue
            raw = self.store.get(keys.run(key[len(keys.INDEX):]))
            if raw is not None:
                out.append(RunRecord.from_dict(raw))
        return out

    def resumable(self) -> list[RunRecord]:
        """Runs worth resuming: running, paused, or failed with retries left."""
        out = []
        for rec in self.list_runs(status=("running", "paused", "failed")):
            if rec.status != RunStatus.FAILED or rec.retries < rec.max_retries:
                out.append(rec)
        return out

    def _load(self, run_id: str) -> Run | None:
        raw = self.store.get(keys.run(run_id))
        if raw is None:
            return None
        steps = {k.rsplit("/", 1)[1]: v for k, v in self.store.scan(keys.steps(run_id))}
        state: RunState = {"run": raw, "steps": steps}
        stored_version = int(raw.get("schema_version", 1))
        if stored_version != self.schema_version:
            state = self.migrate(state)
        run = Run(
            self,
            RunRecord.from_dict(state["run"]),
            {sid: StepRecord.from_dict(d) for sid, d in state["steps"].items()},
        )
        run._version = self.store.get_version(keys.run(run_id))
        if stored_version != self.schema_version:
            # Write the upgraded state back, so it is migrated once.
            with run._batch() as b:
                run._write_run(b)
                for rec in run.steps.values():
                    b.put(keys.step(run_id, rec.step_id), rec.to_dict())
            run._version_from(b)
        return run

    def migrate(self, state: RunState) -> RunState:
        """Upgrade a state to the current schema version (or refuse a newer one)."""
        version = int(state["run"].get("schema_version", 1))
        if version > self.schema_version:
            raise SchemaVersionError(
                f"run {state['run'].get('run_id')!r} was written with workflow-state schema "
                f"version {version}; this code knows versions up to {self.schema_version}"
            )
        while version < self.schema_version:
            state = self.migrations[version - 1](state)
            version += 1
            state["run"]["schema_version"] = version
        return state

    # -- hydration, restoration, retention ------------------------------------

    def hydrate(
        self,
        snapshot: dict[str, Any],
        workflow: str,
        run_id: str | None = None,
        *,
        inputs: Any = None,
        source: str = "snapshot",
    ) -> Run:
        """A new run whose steps are the snapshot's ``{step_id: result}``, all ``success``."""
        run = self.run(workflow, run_id, inputs=inputs)
        if run.steps:
            raise WorkflowError(f"run {run.run_id!r} already has steps; hydrate a new run")
        now = utcnow()
        with run._batch() as b:
            for seq, (step_id, output) in enumerate(snapshot.items()):
                _check_id("step id", step_id)
                rec = StepRecord(step_id, StepStatus.SUCCESS.value, seq=seq, attempts=0,
                                 created_at=now, completed_at=now, updated_at=now)
                run._set_output(b, rec, output)
                run.steps[step_id] = rec
                b.put(keys.step(run.run_id, step_id), rec.to_dict())
            run.record.steps_done = len(snapshot)
            run.record.next_seq = len(snapshot)
            run.record.restoration_source = source
            run._summarise()
            run._write_run(b)
        run._version_from(b)
        return run

    def validate(self, state: RunState, validator: Validator | None = None) -> list[str]:
        """Problems with a state; empty when it is valid. The rules:

        1. the run record has a run id, a workflow and a known status;
        2. every step record has a known status;
        3. every ``success`` step's output is readable;
        4. the run's ``steps_done`` equals its number of ``success`` steps;
        5. the caller's validator, if any, accepts it (returns None/True, or
           a list of problems, or raises).
        """
        problems: list[str] = []
        run = state.get("run") or {}
        if not run.get("run_id") or not run.get("workflow"):
            problems.append("run record lacks run_id or workflow")
        if run.get("status") not in RUN_STATUSES:
            problems.append(f"unknown run status {run.get('status')!r}")
        done = 0
        for sid, rec in state.get("steps", {}).items():
            status = rec.get("status")
            if status not in STEP_STATUSES:
                problems.append(f"step {sid!r} has unknown status {status!r}")
            if status == StepStatus.SUCCESS:
                done += 1
                key = rec.get("output_key")
                if key is not None and self.store.get_version(key) is None:
                    problems.append(f"step {sid!r}: output {key!r} is missing")
        if run.get("steps_done", done) != done:
            problems.append(f"steps_done is {run.get('steps_done')} but {done} steps succeeded")
        if validator is not None and not problems:
            try:
                verdict = validator(state)
            except Exception as exc:  # noqa: BLE001 - a validator says no by raising
                problems.append(f"validator rejected the state: {exc}")
            else:
                if verdict is False:
                    problems.append("validator rejected the state")
                elif isinstance(verdict, list | tuple):
                    problems.extend(str(p) for p in verdict)
        return problems

    def restore(
        self,
        run_id: str,
        workflow: str,
        *,
        validator: Validator | None = None,
        source: str = "restart",
        inputs: Any = None,
    ) -> Restoration:
        """The supervisor's restoration protocol (SPEC 3.3).

        No state: start fresh, and say so. A state that fails validation: roll
        back to the newest checkpoint that passes; if none does, start fresh
        (the invalid state is kept under ``runs/<id>/discarded/``). A valid
        state: restore it. Restorations are counted, with time and source;
        pending questions (``metadata["pending_questions"]``) and waiting steps
        are handed back.
        """
        run = self._load(run_id)
        if run is None:
            fresh = self.run(workflow, run_id, inputs=inputs)
            return Restoration("fresh", fresh, "no saved state")
        problems = self.validate(run.state(), validator)
        outcome, reason = "restored", "state is valid"
        if problems:
            for info in reversed(run.checkpoints()):
                cp_state = run._checkpoint_state(info.name)
                if not self.validate(cp_state, validator):
                    run.rollback(info.name)
                    outcome, reason = "checkpoint", f"state invalid; rolled back to {info.name!r}"
                    break
            else:
                now = utcnow()
                fresh = run._discard_all(RunRecord(
                    run_id=run_id, workflow=workflow, schema_version=self.schema_version,
                    inputs=inputs, created_at=now, updated_at=now,
                ))
                return Restoration("fresh", fresh, "state invalid and no valid checkpoint",
                                   problems=problems)
        run.record.restoration_count += 1
        run.record.last_restored_at = utcnow()
        run.record.restoration_source = source
        with run._batch() as b:
            run._write_run(b)
        run._version_from(b)
        waiting = [
            s.step_id for s in run.ordered_steps()
            if s.status in (StepStatus.PENDING, StepStatus.RUNNING, StepStatus.NEEDS_ATTENTION)
        ]
        questions = list(run.record.metadata.get("pending_questions", []))
        return Restoration(outcome, run, reason, questions, waiting, problems)

    def apply_retention(
        self, policy: RetentionPolicy, *, now: dt.datetime | None = None
    ) -> RetentionReport:
        """Remove runs (with their steps, outputs and checkpoints) older than the policy."""
        now = now or utcnow()
        cutoff = now - dt.timedelta(seconds=policy.max_age_seconds)
        removed: list[str] = []
        count = 0
        for rec in self.list_runs(status=policy.statuses):
            stamp = rec.completed_at or rec.updated_at or rec.created_at
            if stamp is None or stamp > cutoff:
                continue
            doomed = [keys.run(rec.run_id), keys.index(rec.run_id)]
            doomed += self.store.keys(keys.all_of_run(rec.run_id))
            with self.store.batch() as b:
                for key in doomed:
                    b.delete(key)
            removed.append(rec.run_id)
            count += len(doomed)
        return RetentionReport(removed, count)


class Run:
    """One run: its record and its steps. Drive it with ``with run:``."""

    def __init__(self, wf: Workflows, record: RunRecord, steps: dict[str, StepRecord]) -> None:
        self.wf = wf
        self.store = wf.store
        self.record = record
        self.steps = steps
        self._version: Version | None = None
        self._call_counts: dict[str, int] = {}
        self._token: contextvars.Token[Run | None] | None = None
        #: steps found interrupted when the run was started: (step id, action taken)
        self.interrupted: list[tuple[str, str]] = []
        #: statuses as last committed, against which a commit's transitions are
        #: announced (store.events): the run's, and each step's
        self._seen_status: str | None = record.status
        self._seen_steps: dict[str, str] = {sid: s.status for sid, s in steps.items()}

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def fence(self) -> int:
        """The lease token stamped on this run's writes (0: no lease)."""
        return self.record.lease_token or 0

    def set_lease(self, holder: str, token: int) -> None:
        """Record the lease this host holds; every later write carries its token."""
        self.record.owner_node = holder
        self.record.lease_token = token
        self._commit_run()

    def _batch(self) -> Batch:
        return self.store.batch(fence=self.fence)

    @property
    def status(self) -> str:
        return self.record.status

    @property
    def cost(self) -> Cost:
        return Cost.from_dict(self.record.cost)

    def ordered_steps(self) -> list[StepRecord]:
        return sorted(self.steps.values(), key=lambda s: s.seq)

    def state(self) -> RunState:
        return {"run": self.record.to_dict(),
                "steps": {sid: s.to_dict() for sid, s in self.steps.items()}}

    def next_step_id(self, base: str) -> str:
        n = self._call_counts.get(base, 0) + 1
        self._call_counts[base] = n
        return base if n == 1 else f"{base}#{n}"

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> Run:
        self.start()
        # Each drive calls the decorated steps from the start again: their
        # ids (name, name#2, ...) must be the ones the previous drive used.
        self._call_counts = {}
        self._token = _current_run.set(self)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._token is not None:
            _current_run.reset(self._token)
            self._token = None
        if exc is None:
            if self.record.status == RunStatus.RUNNING:
                self.complete()
        elif isinstance(exc, StepNeedsAttentionError):
            self.pause(reason=str(exc))
        elif isinstance(exc, Exception) and self.record.status == RunStatus.RUNNING:
            self.fail(exc)

    def start(self) -> None:
        """Mark the run running; settle steps a crash left ``running``."""
        rec = self.record
        if rec.status in _TERMINAL_RUN:
            return
        now = utcnow()
        with self._batch() as b:
            for s in self.steps.values():
                if s.status != StepStatus.RUNNING:
                    continue
                s.interrupted_at = now
                s.updated_at = now
                if s.idempotent:
                    self.interrupted.append((s.step_id, "resumes from its cursor"))
                else:
                    s.status = StepStatus.NEEDS_ATTENTION.value
                    self.interrupted.append((s.step_id, "needs attention"))
                b.put(keys.step(self.run_id, s.step_id), s.to_dict())
            if rec.status == RunStatus.FAILED:
                rec.retries += 1
            rec.status = RunStatus.RUNNING.value
            rec.error = None
            rec.started_at = rec.started_at or now
            rec.updated_at = now
            self._write_run(b)
        self._version_from(b)

    def complete(self) -> None:
        now = utcnow()
        self.record.status = RunStatus.COMPLETED.value
        self.record.progress = 100.0
        self.record.completed_at = now
        self.record.current_step = None
        self._commit_run()

    def fail(self, exc: BaseException) -> None:
        self.record.status = RunStatus.FAILED.value
        self.record.error = describe_error(exc)
        self._commit_run()

    def pause(self, reason: str | None = None) -> None:
        self.record.status = RunStatus.PAUSED.value
        if reason:
            self.record.metadata["paused_reason"] = reason
        self._commit_run()

    def cancel(self) -> None:
        self.record.status = RunStatus.CANCELLED.value
        self.record.completed_at = utcnow()
        self._commit_run()

    def set_metadata(self, **values: Any) -> None:
        """Merge free metadata (e.g. ``pending_questions``, spawned task ids) into the run."""
        self.record.metadata.update(values)
        self._commit_run()

    # -- steps -----------------------------------------------------------------

    def step(
        self,
        step_id: str,
        fn: Callable[..., T],
        *args: Any,
        idempotent: bool = True,
        inputs: Any = None,
        **kwargs: Any,
    ) -> T:
        """Run ``fn(*args, **kwargs)`` as step ``step_id`` once; afterwards return its output."""
        with self.begin(step_id, idempotent=idempotent, inputs=inputs) as ctx:
            if not ctx.done:
                ctx.complete(fn(*args, **kwargs))
        return ctx.output  # type: ignore[no-any-return]

    def begin(self, step_id: str, *, idempotent: bool = True, inputs: Any = None) -> StepContext:
        """The context-manager form: ``with run.begin("s") as s: if not s.done: s.complete(x)``."""
        _check_id("step id", step_id)
        return StepContext(self, step_id, idempotent, inputs)

    def resolve(self, step_id: str, action: str, output: Any = None) -> None:
        """Decide a ``needs_attention`` step: 'retry' (run it again), 'skip', or 'succeed'."""
        rec = self.steps.get(step_id)
        if rec is None:
            raise WorkflowError(f"run {self.run_id!r} has no step {step_id!r}")
        if action not in ("retry", "skip", "succeed"):
            raise ValueError(f"action must be 'retry', 'skip' or 'succeed', not {action!r}")
        now = utcnow()
        with self._undo_on_error(rec):
            if action != "succeed" and rec.status == StepStatus.SUCCESS:
                # Undoing a success: the run's summary must stop counting it.
                self.record.steps_done -= 1
                self._summarise()
            with self._batch() as b:
                if action == "retry":
                    rec.status = StepStatus.PENDING.value
                elif action == "skip":
                    rec.status = StepStatus.SKIPPED.value
                else:
                    self._succeed(b, rec, output, Cost(), now)
                rec.updated_at = now
                b.put(keys.step(self.run_id, step_id), rec.to_dict())
                self._write_run(b)
        self._version_from(b)

    def output(self, step_id: str) -> Any:
        rec = self.steps[step_id]
        if rec.output_key is not None:
            return self.store.get(rec.output_key)
        return rec.output

    def snapshot(self) -> dict[str, Any]:
        """``{step_id: output}`` of every successful step, in execution order."""
        return {s.step_id: self.output(s.step_id) for s in self.ordered_steps()
                if s.status == StepStatus.SUCCESS}

    # -- checkpoints and rollback ----------------------------------------------

    def checkpoint(self, name: str, description: str = "", tags: Sequence[str] = ()) -> None:
        """Record the run and its steps as they are now, under ``name``."""
        _check_id("checkpoint name", name)
        with self._batch() as b:
            b.put(keys.checkpoint(self.run_id, name), {
                "name": name, "description": description, "tags": list(tags),
                "created_at": utcnow(), **self.state(),
            })
            b.notes.append(RunCheckpointEvent(run_id=self.run_id, name=name, action="created"))

    def checkpoints(self) -> list[CheckpointInfo]:
        """Named checkpoints, oldest first."""
        out = [
            CheckpointInfo(cp["name"], cp["description"], list(cp["tags"]), cp["created_at"],
                           len(cp["steps"]), cp["run"]["status"])
            for _, cp in self.store.scan(keys.checkpoints(self.run_id))
        ]
        return sorted(out, key=lambda c: c.created_at)

    def _checkpoint_state(self, name: str) -> RunState:
        cp = self.store.get(keys.checkpoint(self.run_id, name))
        if cp is None:
            raise CheckpointNotFoundError(f"run {self.run_id!r} has no checkpoint {name!r}")
        return self.wf.migrate({"run": cp["run"], "steps": cp["steps"]})

    def rollback(self, name: str) -> RollbackReport:
        """Return the run to checkpoint ``name``; what it replaces stays readable.

        Step records that the rollback changes or removes are kept under
        ``runs/<id>/discarded/<n>/`` (see ``discarded``) until retention
        removes the run. The summed cost is not rolled back: it is money spent.
        """
        state = self._checkpoint_state(name)
        cp_steps = {sid: StepRecord.from_dict(d) for sid, d in state["steps"].items()}
        n = self.record.rollbacks + 1
        prefix = keys.discarded(self.run_id, n)
        discarded, restored = [], []
        with self._batch() as b:
            for sid, cur in self.steps.items():
                old = cp_steps.get(sid)
                if old is None or old.to_dict() != cur.to_dict():
                    b.put(prefix + sid, cur.to_dict())
                    discarded.append(sid)
                if old is None:
                    b.delete(keys.step(self.run_id, sid))
            for sid, old in cp_steps.items():
                if sid not in self.steps or old.to_dict() != self.steps[sid].to_dict():
                    b.put(keys.step(self.run_id, sid), old.to_dict())
                    restored.append(sid)
            cost = self.record.cost
            restoration = (self.record.restoration_count, self.record.last_restored_at,
                           self.record.restoration_source)
            self.record = RunRecord.from_dict(state["run"])
            self.record.cost = cost
            (self.record.restoration_count, self.record.last_restored_at,
             self.record.restoration_source) = restoration
            self.record.rollbacks = n
            if self.record.status not in (RunStatus.PENDING,):
                self.record.status = RunStatus.PAUSED.value
            self.record.metadata["rolled_back_to"] = name
            self.steps = cp_steps
            b.notes.append(RunCheckpointEvent(run_id=self.run_id, name=name,
                                              action="rolled_back"))
            self._write_run(b)
        self._version_from(b)
        return RollbackReport(name, n, discarded, restored)

    def discarded(self) -> dict[int, dict[str, dict[str, Any]]]:
        """Step records replaced by each rollback: ``{rollback n: {step_id: record}}``."""
        out: dict[int, dict[str, dict[str, Any]]] = {}
        base = f"runs/{self.run_id}/discarded/"
        for key, rec in self.store.scan(base):
            n, _, sid = key[len(base):].partition("/")
            out.setdefault(int(n), {})[sid] = rec
        return out

    def _discard_all(self, fresh: RunRecord) -> Run:
        """Keep an invalid state under discarded/ and replace it by ``fresh`` (restoration).

        The fresh run inherits the rollback count, so its own rollbacks and
        outputs never land on the keys of the state kept here. One commit.
        """
        n = self.record.rollbacks + 1
        prefix = keys.discarded(self.run_id, n)
        fresh.rollbacks = n
        replacement = Run(self.wf, fresh, {})
        replacement._version = self._version
        replacement._seen_status = self._seen_status
        with self._batch() as b:
            b.put(prefix + "__run__", self.record.to_dict())
            for sid, rec in self.steps.items():
                b.put(prefix + sid, rec.to_dict())
                b.delete(keys.step(self.run_id, sid))
            replacement._write_run(b)
        replacement._version_from(b)
        return replacement

    # -- writing ---------------------------------------------------------------

    def _write_run(self, b: Batch, *, expect: Any = ANY) -> None:
        """Stage the run record and its index entry, checked against the version read."""
        if expect is ANY and self._version is not None:
            expect = self._version
        self.record.updated_at = utcnow()
        b.put(keys.run(self.run_id), self.record.to_dict(), expect=expect)
        b.put(keys.index(self.run_id), self.record.index_entry())
        b.notes.extend(self._transitions(b))

    def _transitions(self, b: Batch) -> list[Event]:
        """The step and run status changes the batch makes, as events it carries.

        Compared with the statuses last committed, not with the records in
        memory, which a failed commit may have changed and put back.
        """
        out: list[Event] = []
        prefix = keys.steps(self.run_id)
        for op in b.ops:
            if isinstance(op, Put) and op.key.startswith(prefix) and isinstance(op.value, dict):
                sid = op.key[len(prefix):]
                old, new = self._seen_steps.get(sid), str(op.value["status"])
                if new != old:
                    out.append(StepEvent(run_id=self.run_id, step_id=sid, old_status=old,
                                         new_status=new,
                                         attempts=int(op.value.get("attempts") or 0)))
        if self.record.status != self._seen_status:
            out.append(RunEvent(run_id=self.run_id, old_status=self._seen_status,
                                new_status=self.record.status))
        return out

    def _version_from(self, b: Batch) -> None:
        """Remember the run record's version after a commit (for the next expect=),
        and the statuses it committed (for the next transitions)."""
        if b.result is not None:
            self._version = Version(self.store.node_id, b.result.lsn, b.result.hlc, {})
            prefix = keys.steps(self.run_id)
            for op in b.ops:
                if op.key.startswith(prefix):
                    sid = op.key[len(prefix):]
                    if isinstance(op, Put) and isinstance(op.value, dict):
                        self._seen_steps[sid] = str(op.value["status"])
                    else:
                        self._seen_steps.pop(sid, None)
            for note in b.notes:
                if isinstance(note, RunEvent):
                    self._seen_status = note.new_status

    def _commit_run(self) -> None:
        with self._batch() as b:
            self._write_run(b)
        self._version_from(b)

    def _summarise(self) -> None:
        rec = self.record
        if rec.total_steps:
            rec.progress = min(100.0, 100.0 * rec.steps_done / rec.total_steps)

    @contextlib.contextmanager
    def _undo_on_error(self, rec: StepRecord) -> Iterator[None]:
        """Put the run and step records back as they were if the change fails.

        The change's commit is the last thing in the block, so an Exception
        means nothing was written: keeping the mutated records would let the
        next commit store a state that never happened (e.g. a success counted
        in ``steps_done`` for a step that failed).
        """
        saved_run, saved_step = copy.copy(self.record), copy.copy(rec)
        try:
            yield
        except Exception:
            self.record.__dict__.update(saved_run.__dict__)
            rec.__dict__.update(saved_step.__dict__)
            raise

    def _set_output(self, b: Batch, rec: StepRecord, output: Any) -> None:
        try:
            size = len(cbor2.dumps(output)) if output is not None else 0
        except (cbor2.CBOREncodeError, TypeError, ValueError, RecursionError) as exc:
            raise InvalidValueError(
                f"output of step {rec.step_id!r} of run {self.run_id!r} cannot be stored: {exc}"
            ) from None
        if size > self.wf.inline_output_bytes:
            key = keys.output(self.run_id, rec.step_id, rec.attempts, self.record.rollbacks)
            b.put(key, output)
            rec.output, rec.output_key = None, key
        else:
            rec.output, rec.output_key = output, None

    def _succeed(self, b: Batch, rec: StepRecord, output: Any, cost: Cost,
                 now: dt.datetime) -> None:
        if rec.status != StepStatus.SUCCESS:
            self.record.steps_done += 1
        rec.status = StepStatus.SUCCESS.value
        rec.completed_at = now
        rec.fraction = 1.0
        rec.error = None
        self._set_output(b, rec, output)
        self._add_cost(rec, cost)
        self._summarise()

    def _add_cost(self, rec: StepRecord, cost: Cost) -> None:
        if not cost:
            return
        step_cost = Cost.from_dict(rec.cost)
        step_cost.add(cost)
        rec.cost = step_cost.to_dict()
        run_cost = Cost.from_dict(self.record.cost)
        run_cost.add(cost)
        self.record.cost = run_cost.to_dict()


class StepContext:
    """One execution of a step; the body reports progress and cost through it."""

    def __init__(self, run: Run, step_id: str, idempotent: bool, inputs: Any) -> None:
        self.run = run
        self.step_id = step_id
        self._unflushed = Cost()
        self._output: Any = None
        self._completed = False
        self._token: contextvars.Token[StepContext | None] | None = None
        rec = run.steps.get(step_id)
        if rec is None:
            rec = StepRecord(step_id, seq=run.record.next_seq, idempotent=idempotent,
                             inputs=inputs, created_at=utcnow())
            run.record.next_seq += 1
            run.steps[step_id] = rec
        self.record = rec
        #: True when the step had already succeeded: the body must not run
        self.done = rec.status == StepStatus.SUCCESS
        if self.done:
            self._output = run.output(step_id)

    @property
    def output(self) -> Any:
        return self._output

    @property
    def cursor(self) -> Any:
        """The cursor saved by the last ``progress`` call (None on a first run)."""
        return self.record.cursor

    @property
    def attempt(self) -> int:
        return self.record.attempts

    def __enter__(self) -> StepContext:
        if self.done:
            return self
        rec = self.record
        if rec.status == StepStatus.NEEDS_ATTENTION:
            raise StepNeedsAttentionError(self.run.run_id, self.step_id)
        if rec.status == StepStatus.RUNNING and not rec.idempotent:
            # Interrupted after the run was started (a crash inside this process
            # is impossible here, so another driver left it): same rule.
            raise StepNeedsAttentionError(self.run.run_id, self.step_id)
        now = utcnow()
        run = self.run
        with run._undo_on_error(rec):
            rec.status = StepStatus.RUNNING.value
            rec.attempts += 1
            rec.started_at = now
            rec.updated_at = now
            rec.error = None
            run.record.current_step = self.step_id
            with run._batch() as b:
                b.put(keys.step(run.run_id, self.step_id), rec.to_dict())
                run._write_run(b)
        run._version_from(b)
        self._token = _current_step.set(self)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._token is not None:
            _current_step.reset(self._token)
            self._token = None
        if self.done and not self._completed:
            return
        if exc is None:
            if not self._completed:
                self.complete(None)
            return
        rec, run = self.record, self.run
        now = utcnow()
        rec.status = StepStatus.FAILURE.value if isinstance(exc, Exception) \
            else StepStatus.CANCELLED.value
        rec.error = describe_error(exc)
        rec.updated_at = now
        run._add_cost(rec, self._unflushed)
        self._unflushed = Cost()
        with run._batch() as b:
            b.put(keys.step(run.run_id, self.step_id), rec.to_dict())
            run._write_run(b)
        run._version_from(b)

    def progress(self, fraction: float, cursor: Any = None) -> None:
        """Durably record partial progress (0..1) and a resume cursor of your choosing."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be within 0..1, got {fraction}")
        rec, run = self.record, self.run
        with run._undo_on_error(rec):
            rec.fraction = fraction
            rec.cursor = cursor
            rec.updated_at = utcnow()
            run._add_cost(rec, self._unflushed)
            with run._batch() as b:
                b.put(keys.step(run.run_id, self.step_id), rec.to_dict())
                run._write_run(b)
        self._unflushed = Cost()
        run._version_from(b)

    def add_cost(self, tokens_in: int = 0, tokens_out: int = 0, usd: float = 0.0,
                 **counters: float) -> None:
        """Count usage; written with the next progress, completion or failure."""
        self._unflushed.add(Cost(tokens_in, tokens_out, usd, dict(counters)))

    def complete(self, output: Any) -> None:
        """Record the output and mark the step ``success`` with the run's summary, atomically."""
        if self.done:
            raise WorkflowError(f"step {self.step_id!r} already succeeded")
        rec, run = self.record, self.run
        now = utcnow()
        # If the commit fails (an output cbor2 cannot encode, a conflict...),
        # nothing was written: the records stay as they were, the cost stays
        # to be counted with the failure.
        with run._undo_on_error(rec):
            rec.updated_at = now
            with run._batch() as b:
                run._succeed(b, rec, output, self._unflushed, now)
                b.put(keys.step(run.run_id, self.step_id), rec.to_dict())
                run.record.current_step = self.step_id
                run._write_run(b)
        self._unflushed = Cost()
        run._version_from(b)
        self._output = output
        self._completed = True
        self.done = True


def _new_run_id() -> str:
    return utcnow().strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)


def _check_id(what: str, value: str) -> None:
    if not isinstance(value, str) or not value or "/" in value:
        raise ValueError(f"{what} must be a non-empty string without '/', got {value!r}")

