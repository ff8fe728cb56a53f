"""The workflow layer over one store: create, find, list, upgrade and retire runs.

An orchestrator adopts it in a few lines::

    wf = Workflows(Store.open("state"))
    with wf.run("nightly-etl", run_id="2026-11-23") as run:
        rows = run.step("fetch", fetch, day)      # after a crash: the recorded output
        clean = run.step("transform", transform, rows)
        run.step("charge", charge_card, clean, idempotent=False)

Resume rules (README's resume table): a ``success`` step never runs again and returns its
recorded output; ``failure``, ``cancelled``, ``skipped`` and ``pending`` steps
run (again); a step found ``running`` when a run is started was interrupted
by a crash: it runs again from its last cursor if it is idempotent, and
becomes ``needs_attention`` (and raises StepNeedsAttentionError) if it is not,
until the orchestrator resolves it.

Runs live in the reserved namespace (engine/workflow/keys.py). A record there
that is not one the layer wrote is a CorruptionError naming its key, never a
TypeError. Runs an older walsync wrote in the legacy spelling are read where
they are and moved into the namespace by this host's first write to them; the
first ``Workflows`` on a writable store moves the ones this store wrote
(engine/workflow/legacy.py).
"""

from __future__ import annotations

import datetime as dt
import secrets
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import RunNotFoundError, SchemaVersionError, WorkflowError
from ..store import Store
from . import keys, legacy, recovery
from .aio import RunOpener
from .leases import LeaseLike, lease_refusal, local_lease
from .records import (
    RUN_STATUSES,
    STEP_STATUSES,
    RunRecord,
    StepRecord,
    StepStatus,
    checked_index_entry,
    checked_run,
    checked_state,
    checked_step,
    utcnow,
)
from .recovery import Recovery, Validator
from .run import Run, RunState

__all__ = ["Migration", "RetentionPolicy", "RetentionReport", "Validator", "Workflows"]

Migration = Callable[[RunState], RunState]


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
        #: runs of the legacy spelling this store wrote, moved into the namespace now
        #: (once per store: engine/workflow/legacy.py)
        self.moved_runs = legacy.move_own_runs(self)

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
            keys.check_id("run id", run_id)
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

    def arun(self, workflow: str, run_id: str | None = None, **kwargs: Any) -> RunOpener:
        """``run``'s awaitable form: ``async with wf.arun("etl", "r1") as run:`` drives
        the run (engine/workflow/aio.py); ``await wf.arun(...)`` only creates or finds it."""
        return RunOpener(self, (workflow, run_id), kwargs)

    def get_run(self, run_id: str) -> Run:
        run = self._load(run_id)
        if run is None:
            raise RunNotFoundError(f"no run {run_id!r} in store {self.store.path}")
        return run

    def list_runs(
        self, *, status: str | Sequence[str] | None = None, workflow: str | None = None
    ) -> list[RunRecord]:
        """Runs by id, filtered on their index entries (their steps are not read)."""
        wanted = {status} if isinstance(status, str) else set(status or ())
        out = []
        seen: set[str] = set()
        for key, value in self.store.scan(keys.INDEX):
            run_id = key[len(keys.INDEX):]
            entry = checked_index_entry(key, value)
            seen.add(run_id)
            if wanted and entry["status"] not in wanted:
                continue
            if workflow is not None and entry["workflow"] != workflow:
                continue
            raw = self.store.get(keys.run(run_id))
            if raw is not None:
                out.append(checked_run(keys.run(run_id), raw, run_id))
        older = [(run_id, entry, raw) for run_id, entry, raw in legacy.runs(self.store)
                 if run_id not in seen]
        for run_id, entry, raw in older:
            if wanted and entry["status"] not in wanted:
                continue
            if workflow is not None and entry["workflow"] != workflow:
                continue
            out.append(checked_run(keys.LEGACY.run(run_id), raw, run_id))
        if older:
            out.sort(key=lambda r: r.run_id)
        return out

    def resumable(self) -> list[RunRecord]:
        """Runs worth resuming: running, paused, or failed with retries left."""
        out = []
        for rec in self.list_runs(status=("running", "paused", "failed")):
            if rec.status != "failed" or rec.retries < rec.max_retries:
                out.append(rec)
        return out

    def _load(self, run_id: str) -> Run | None:
        """The run as stored (in the namespace, else in the legacy spelling), or None."""
        grammar = keys.CURRENT
        found = legacy.read(self.store, grammar, run_id)
        if found is None:
            grammar = keys.LEGACY
            found = legacy.read(self.store, grammar, run_id)
            if found is None:
                return None
        raw, stored_steps, version = found
        key = grammar.run(run_id)
        stored_version = checked_state(key, raw).get("schema_version", 1)
        state: RunState = {"run": raw, "steps": stored_steps}
        if stored_version != self.schema_version:
            for sid, value in stored_steps.items():
                checked_state(grammar.step(run_id, sid), value, what="the step record")
            state = self.migrate(state)
        run = Run(
            self,
            checked_run(key, state["run"], run_id),
            {sid: checked_step(grammar.step(run_id, sid), d, sid)
             for sid, d in state["steps"].items()},
        )
        run._version = version
        run._grammar = grammar
        if stored_version != self.schema_version and grammar is keys.CURRENT \
                and not self.store.readonly \
                and lease_refusal(run.record, self.store, *local_lease(self.store, run_id)) is None:
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

    # -- hydration, recovery, retention ----------------------------------------

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
                keys.check_id("step id", step_id)
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

    def recover(
        self,
        run_id: str,
        workflow: str,
        *,
        validator: Validator | None = None,
        source: str = "restart",
        inputs: Any = None,
        lease: tuple[str, int] | LeaseLike | None = None,
    ) -> Recovery:
        """The supervisor's recovery protocol (engine/workflow/recovery.py).

        No state: start fresh, and say so (``outcome`` "fresh"). A state that
        fails validation: roll back to the newest checkpoint that passes
        ("checkpoint"); if none does, start fresh, the invalid state kept under
        the run's ``discarded`` keys. A valid state: take it up ("recovered").
        Recoveries are counted, with time and source; pending questions
        (``metadata["pending_questions"]``) and waiting steps are handed back.
        ``lease`` as for ``run``: a leased run is recovered by the holder of its
        lease.
        """
        return recovery.recover(self, run_id, workflow, validator=validator, source=source,
                                inputs=inputs, lease=lease)

    def restore(self, run_id: str, workflow: str, **kwargs: Any) -> Recovery:
        """Deprecated name of ``recover`` ("restore" is the sync layer's host-loss restore)."""
        warnings.warn("Workflows.restore is now Workflows.recover", DeprecationWarning,
                      stacklevel=2)
        return self.recover(run_id, workflow, **kwargs)

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
            held, lost = local_lease(self.store, rec.run_id)
            if lease_refusal(rec, self.store, held, lost) is not None:
                elsewhere.append(rec.run_id)
                continue
            if self.store.get_version(keys.run(rec.run_id)) is not None:
                doomed = [keys.run(rec.run_id), keys.index(rec.run_id)]
                doomed += self.store.keys(keys.all_of_run(rec.run_id))
            else:
                doomed = legacy.keys_of(self.store, rec.run_id)
            with self.store.batch(fence=held or 0, internal=True) as b:
                for key in doomed:
                    b.delete(key)
            removed.append(rec.run_id)
            count += len(doomed)
        return RetentionReport(removed, count, elsewhere)


def _new_run_id() -> str:
    return utcnow().strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)
