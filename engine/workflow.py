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

Leases (sync/PROTOCOL.md, "Leases and fencing"): a write to a leased run
carries the token of this host's own acquisition of the lease, kept in the
store's host-local state (``hold_lease``; never replicated, never restored),
not the token in the run record, which may be another host's, pulled or
restored. A write to a run whose record names a lease this host does not
hold raises LeaseLostError before anything is written; the server refuses
whatever gets past that (a pause, a host that did not pull yet).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import datetime as dt
import functools
import json
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, overload

import cbor2

from .errors import (
    CheckpointNotFoundError,
    ConflictError,
    InvalidValueError,
    LeaseLostError,
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
    "drop_lease",
    "held_lease",
    "hold_lease",
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


# -- this host's own leases ------------------------------------------------------

#: sync_state name of a run's lease as this host acquired it (host-local: the
#: snapshot's meta table is neither shipped, pulled, exported nor restored; a
#: copied directory carries it, but under the node id it was taken by)
_HELD = "lease/"

_TAKE_OVER = ("take the run's lease first (sync.lease.Leases(transport, store=store)"
              ".acquire(run_id, wait_seconds=...) waits for the holder's lease to expire), "
              "then pass it: Workflows.run(..., lease=lease) or Run.set_lease(lease)")


class LeaseLike(Protocol):
    """A lease as sync.lease hands it out (the engine does not import sync)."""

    @property
    def run_id(self) -> str: ...

    @property
    def holder(self) -> str: ...

    @property
    def token(self) -> int: ...


def _held_doc(store: Store, run_id: str) -> dict[str, Any] | None:
    raw = store.sync_state(_HELD + run_id)
    if not raw:
        return None
    doc: dict[str, Any] = json.loads(raw)
    return doc if doc.get("holder") == store.node_id else None


def _local_lease(store: Store, run_id: str) -> tuple[int | None, dict[str, Any] | None]:
    """(this host's token, or None; the server's word on a lease it lost, or None)."""
    doc = _held_doc(store, run_id)
    if doc is None:
        return None, None
    if doc.get("token") is not None:
        return int(doc["token"]), None
    return None, doc if doc.get("lost_to") is not None else None


def held_lease(store: Store, run_id: str) -> int | None:
    """The token of this store's own acquisition of ``run_id``'s lease, or None.

    Kept under the node id that acquired it: a copied store, or one that took a
    new node id, holds nothing (the server accepts a leased run's entries from
    the holder's node id alone).
    """
    return _local_lease(store, run_id)[0]


def hold_lease(store: Store, run_id: str, token: int) -> None:
    """Record that this store's node acquired ``run_id``'s lease with ``token``.

    Only what an acquisition returned belongs here (sync.lease does it when it
    has the store): a token read from a run record is another host's.
    """
    if isinstance(token, bool) or not isinstance(token, int) or not 0 < token < 1 << 63:
        raise ValueError(f"lease token must be a positive 63-bit integer, got {token!r}")
    store.set_sync_state(_HELD + run_id, json.dumps(
        {"holder": store.node_id, "token": token}).encode())


def drop_lease(store: Store, run_id: str, *, upto_token: int | None = None,
               lost_to: str | None = None, current_token: int = 0) -> bool:
    """Forget this host's lease on ``run_id`` (released, or lost to another host).

    With ``upto_token``, only a lease whose token is at most that one: a lease
    this host took again meanwhile (a larger token) stays. ``lost_to`` and
    ``current_token`` (the server's word on who holds it now) are kept for the
    LeaseLostError of the next write, also when this host held no lease (it
    wrote to the run without one). True if a lease was dropped.
    """
    held = held_lease(store, run_id)
    if held is not None and upto_token is not None and held > upto_token:
        return False
    if held is None and lost_to is None:
        return False
    note = b"" if lost_to is None else json.dumps(
        {"holder": store.node_id, "lost_to": lost_to, "current": current_token}).encode()
    store.set_sync_state(_HELD + run_id, note)
    return held is not None


def _lease_args(lease: tuple[str, int] | LeaseLike, run_id: str) -> tuple[str, int]:
    if isinstance(lease, tuple):
        holder, token = lease
        return str(holder), int(token)
    if lease.run_id != run_id:
        raise WorkflowError(f"the lease given is on run {lease.run_id!r}, not on {run_id!r}")
    return lease.holder, int(lease.token)


def _lease_refusal(record: RunRecord, store: Store, held: int | None,
                   lost: dict[str, Any] | None) -> LeaseLostError | None:
    """Why a host holding ``held`` (its own acquisition) may not write the run, or None.

    The run's lease as this host knows it: the record's (as its holder last
    wrote it), or the server's word when the replicator was told the run was
    lost (``lost``, kept by drop_lease), whichever is newer. A run with neither
    is unleased as far as this host knows (the server still refuses the write
    if it is leased there). Otherwise the host needs a token of its own: newer
    than that lease's, or any when that lease is its own (tokens of one server
    only grow, so a smaller one means the server's were set back, say by a
    restore from a backup, and it decides whether the token is current).
    """
    node, run_id = store.node_id, record.run_id
    holder, token = record.owner_node, record.lease_token or 0
    if lost is not None and int(lost["current"]) >= token:
        holder, token = str(lost["lost_to"]), int(lost["current"])
    if not token:
        return None
    if held is not None and (held > token or holder == node):
        return None
    if held is not None and held < token:
        why = f"this host's lease (token {held}) was taken over by {holder} (token {token})"
    elif held is not None:
        why = (f"it is leased by {holder} with token {token}, which this host has without "
               "having acquired it")
    elif holder == node:
        why = (f"this host no longer holds its lease (token {token}): it was released, or "
               "lost to another host")
    else:
        why = f"it is leased by {holder} (token {token}) and this host holds no lease on it"
    return LeaseLostError(
        f"run {run_id!r}: nothing was written, {why} (store {store.path}, node {node})",
        run_id=run_id, current_token=token, holder=holder, hint=_TAKE_OVER)


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
    #: runs due for removal but leased by another host: its to remove (this host's
    #: deletes would be refused by the server)
    runs_leased_elsewhere: list[str] = field(default_factory=list)


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
        lease: tuple[str, int] | LeaseLike | None = None,
    ) -> Run:
        """The run ``run_id`` if it exists (to resume it), else a new pending run.

        ``lease`` is the run's lease as this host acquired it (a sync.lease
        ``Lease``, or ``(holder, token)``), taken before this call: a new run is
        created with the token already on its first write, an existing one gets
        it (``set_lease``); ``run_id`` defaults to the lease's. Without it, a run
        whose record names a lease this host does not hold is returned for
        reading, and its first write raises LeaseLostError.
        """
        if run_id is None and lease is not None and not isinstance(lease, tuple):
            run_id = lease.run_id
        if run_id is not None:
            existing = self._load(run_id)
            if existing is not None:
                if existing.record.workflow != workflow:
                    raise WorkflowError(
                        f"run {run_id!r} belongs to workflow {existing.record.workflow!r}, "
                        f"not {workflow!r}"
                    )
                if lease is not None:
                    existing.set_lease(lease)
                return existing
        run_id = run_id or _new_run_id()
        _check_id("run id", run_id)
        now = utcnow()
        record = RunRecord(
            run_id=run_id, workflow=workflow, workflow_version=version,
            schema_version=self.schema_version, inputs=inputs, created_at=now, updated_at=now,
            metadata=dict(metadata or {}), total_steps=total_steps, max_retries=max_retries,
        )
        run = Run(self, record, {})
        if lease is not None:
            run._take_lease(lease)
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
        if stored_version != self.schema_version and \
                _lease_refusal(run.record, self.store, *_local_lease(self.store, run_id)) is None:
            # Write the upgraded state back, so it is migrated once (by the lease's
            # holder: another host reads it upgraded in memory).
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
        lease: tuple[str, int] | LeaseLike | None = None,
    ) -> Restoration:
        """The supervisor's restoration protocol (SPEC 3.3).

        No state: start fresh, and say so. A state that fails validation: roll
        back to the newest checkpoint that passes; if none does, start fresh
        (the invalid state is kept under ``runs/<id>/discarded/``). A valid
        state: restore it. Restorations are counted, with time and source;
        pending questions (``metadata["pending_questions"]``) and waiting steps
        are handed back. ``lease`` as for ``run``: a leased run is restored by
        the holder of its lease.
        """
        run = self._load(run_id)
        if run is None:
            fresh = self.run(workflow, run_id, inputs=inputs, lease=lease)
            return Restoration("fresh", fresh, "no saved state")
        if lease is not None:
            run.set_lease(lease)
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
                    owner_node=run.record.owner_node, lease_token=run.record.lease_token,
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
        elsewhere: list[str] = []
        count = 0
        for rec in self.list_runs(status=policy.statuses):
            stamp = rec.completed_at or rec.updated_at or rec.created_at
            if stamp is None or stamp > cutoff:
                continue
            held, lost = _local_lease(self.store, rec.run_id)
            if _lease_refusal(rec, self.store, held, lost) is not None:
                elsewhere.append(rec.run_id)
                continue
            doomed = [keys.run(rec.run_id), keys.index(rec.run_id)]
            doomed += self.store.keys(keys.all_of_run(rec.run_id))
            with self.store.batch(fence=held or 0) as b:
                for key in doomed:
                    b.delete(key)
            removed.append(rec.run_id)
            count += len(doomed)
        return RetentionReport(removed, count, elsewhere)


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
        """The token this host's writes to the run carry: its own acquisition's (0: none).

        Never the run record's ``lease_token``, which names the lease as the
        record was last written, possibly by another host (pulled, restored).
        """
        return held_lease(self.store, self.run_id) or 0

    def set_lease(self, lease: tuple[str, int] | LeaseLike | str, token: int | None = None) -> None:
        """Drive the run under a lease this host acquired (a sync.lease ``Lease``, or
        ``holder, token``); every later write carries its token.

        The holder must be this store's node id (the server accepts a leased run's
        entries from its holder alone), and the token at least the one the run
        record names (an older one was taken over: LeaseLostError).
        """
        given: tuple[str, int] | LeaseLike
        if isinstance(lease, str):
            if token is None:
                raise TypeError("set_lease(holder, token): the token is missing")
            given = (lease, token)
        else:
            given = lease
        changed = self._take_lease(given)
        if changed:
            self._commit_run()

    def _take_lease(self, lease: tuple[str, int] | LeaseLike) -> bool:
        """Check and keep this host's lease; stamp the record. True if the record changed."""
        holder, token = _lease_args(lease, self.run_id)
        node = self.store.node_id
        if holder != node:
            raise WorkflowError(
                f"lease on run {self.run_id!r} is held by {holder!r}, not by this store's node "
                f"{node!r} (store {self.store.path}): the server accepts a leased run's writes "
                "from its holder only",
                hint="take the lease under the store's node id: "
                     "sync.lease.Leases(transport, store=store)")
        refusal = _lease_refusal(self.record, self.store, token,
                                 _local_lease(self.store, self.run_id)[1])
        if refusal is not None:
            raise refusal
        hold_lease(self.store, self.run_id, token)
        if (self.record.owner_node, self.record.lease_token) == (holder, token):
            return False
        self.record.owner_node, self.record.lease_token = holder, token
        return True

    @contextlib.contextmanager
    def _batch(self) -> Iterator[Batch]:
        """A batch of this run's writes, fenced with this host's own lease token.

        Refused (LeaseLostError, nothing written) when the run record names a
        lease this host does not hold. A conflict on the run record whose new
        version names another holder's lease (pulled since this Run was read)
        is reported as the lease loss it is.
        """
        held, lost = _local_lease(self.store, self.run_id)
        rec = self.record
        refusal = _lease_refusal(rec, self.store, held, lost)
        if refusal is not None:
            raise refusal
        if held is not None and (rec.lease_token or 0) < held:
            # taken since the record was written (sync.lease with the store): say so
            rec.owner_node, rec.lease_token = self.store.node_id, held
        try:
            with self.store.batch(fence=held or 0) as b:
                yield b
        except ConflictError as exc:
            if exc.key != keys.run(self.run_id):
                raise
            raw = self.store.get(exc.key)
            if raw is not None:
                current = RunRecord.from_dict(raw)
                refusal = _lease_refusal(current, self.store, held, lost)
                if refusal is not None:
                    raise refusal from exc
            raise

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
        elif isinstance(exc, LeaseLostError):
            return  # the run is another host's: recording the failure would be refused too
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
            lease = (self.record.owner_node, self.record.lease_token)
            self.record = RunRecord.from_dict(state["run"])
            self.record.cost = cost
            # the lease is the one driving the run now, not the checkpoint's
            self.record.owner_node, self.record.lease_token = lease
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
        if isinstance(exc, LeaseLostError):
            return  # the run is another host's now: this host records nothing more
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

