"""One run: its record and its steps, driven with ``with run:``.

What is durable when a call returns: every state change is one commit of the
store (durable per the store's durability); a step's completion, the run's
summary (status, progress, current step, summed cost) and the run index move
in that one commit.

Threads: a Run is driven by one thread at a time. Two drivers of one run in
the same store are caught by optimistic checks on the run record
(ConflictError); across hosts, leases decide who drives
(engine/workflow/leases.py). Every write goes through ``Run._batch``, which
checks the lease, writes through the store's internal door (the run's keys
are in the reserved namespace), and moves a run read from the legacy
spelling into the namespace first (engine/workflow/legacy.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import datetime as dt
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import cbor2

from ..errors import (
    ConflictError,
    InvalidValueError,
    LeaseLostError,
    StepNeedsAttentionError,
    WorkflowError,
)
from ..events import Event, RunEvent, StepEvent
from ..store import ANY, Batch, Put
from ..versions import Version
from . import keys, legacy, rollback
from .leases import LeaseLike, held_lease, hold_lease, lease_args, lease_refusal, local_lease
from .records import (
    Cost,
    RunRecord,
    RunStatus,
    StepRecord,
    StepStatus,
    checked_run,
    describe_error,
    utcnow,
)
from .rollback import CheckpointInfo, RollbackReport
from .step import StepContext, current_run_var

if TYPE_CHECKING:
    from ..aio import DeferredCommits
    from .workflows import Workflows

__all__ = ["Run", "RunState", "deferred_commits_var"]

_T = TypeVar("_T")

#: a state for migrations and validators: {"run": run dict, "steps": {id: step dict}}
RunState = dict[str, Any]

_TERMINAL_RUN = frozenset({RunStatus.COMPLETED, RunStatus.CANCELLED})

#: set (for one synchronous stretch, engine/workflow/aio.py) while an awaited form
#: runs the sync code: the run's commits are then queued there, to be awaited
deferred_commits_var: contextvars.ContextVar[DeferredCommits | None] = contextvars.ContextVar(
    "walsync_deferred_commits", default=None)


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
        #: the spelling the run's keys are read in: the namespace's, or the legacy one
        #: of an older walsync (engine/workflow/legacy.py), until this host's first
        #: write moves the run into the namespace
        self._grammar: keys.Grammar = keys.CURRENT

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
        holder, token = lease_args(lease, self.run_id)
        node = self.store.node_id
        if holder != node:
            raise WorkflowError(
                f"lease on run {self.run_id!r} is held by {holder!r}, not by this store's node "
                f"{node!r} (store {self.store.path}): the server accepts a leased run's writes "
                "from its holder only",
                hint="take the lease under the store's node id: "
                     "sync.lease.Leases(transport, store=store)")
        refusal = lease_refusal(self.record, self.store, token,
                                local_lease(self.store, self.run_id)[1])
        if refusal is not None:
            raise refusal
        hold_lease(self.store, self.run_id, token)
        if (self.record.owner_node, self.record.lease_token) == (holder, token):
            return False
        self.record.owner_node, self.record.lease_token = holder, token
        return True

    def _moved(self) -> None:
        """Move a run read in the legacy spelling into the namespace now, in a commit
        of its own, before a change that reads what it then writes back (a
        rollback's checkpoint): LeaseLostError, and nothing written, if this host
        may not write the run."""
        if self._grammar is keys.CURRENT:
            return
        held, lost = local_lease(self.store, self.run_id)
        refusal = lease_refusal(self.record, self.store, held, lost)
        if refusal is not None:
            raise refusal
        legacy.adopt(self, held)

    @contextlib.contextmanager
    def _batch(self) -> Iterator[Batch]:
        """A batch of this run's writes, fenced with this host's own lease token.

        Refused (LeaseLostError, nothing written) when the run record names a
        lease this host does not hold. A conflict on the run record whose new
        version names another holder's lease (pulled since this Run was read)
        is reported as the lease loss it is.
        """
        held, lost = local_lease(self.store, self.run_id)
        rec = self.record
        refusal = lease_refusal(rec, self.store, held, lost)
        if refusal is not None:
            raise refusal
        if self._grammar is not keys.CURRENT:
            legacy.adopt(self, held)
        if held is not None and (rec.lease_token or 0) < held:
            # taken since the record was written (sync.lease with the store): say so
            rec.owner_node, rec.lease_token = self.store.node_id, held
        deferred = deferred_commits_var.get()
        batch = self.store.batch(fence=held or 0, internal=True) if deferred is None \
            else deferred.batch(fence=held or 0, internal=True)
        try:
            with batch as b:
                yield b
        except ConflictError as exc:
            if exc.key != keys.run(self.run_id):
                raise
            raw = self.store.get(exc.key)
            if raw is not None:
                current = checked_run(exc.key, raw, self.run_id)
                refusal = lease_refusal(current, self.store, held, lost)
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
        self._token = current_run_var.set(self)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._token is not None:
            current_run_var.reset(self._token)
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
        fn: Callable[..., _T],
        *args: Any,
        idempotent: bool = True,
        inputs: Any = None,
        **kwargs: Any,
    ) -> _T:
        """Run ``fn(*args, **kwargs)`` as step ``step_id`` once; afterwards return its output."""
        with self.begin(step_id, idempotent=idempotent, inputs=inputs) as ctx:
            if not ctx.done:
                output = fn(*args, **kwargs)
                if inspect.isawaitable(output):
                    if inspect.iscoroutine(output):
                        output.close()
                    raise WorkflowError(
                        f"step {step_id!r} of run {self.run_id!r} returned an awaitable: an "
                        "async step is awaited in an async run (`async with run:` and "
                        "`await run.step(...)`, engine/workflow/aio.py)")
                ctx.complete(output)
        return ctx.output  # type: ignore[no-any-return]

    def begin(self, step_id: str, *, idempotent: bool = True, inputs: Any = None) -> StepContext:
        """The context-manager form: ``with run.begin("s") as s: if not s.done: s.complete(x)``."""
        keys.check_id("step id", step_id)
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

    # -- checkpoints and rollback (engine/workflow/rollback.py) ---------------

    def checkpoint(self, name: str, description: str = "", tags: Sequence[str] = ()) -> None:
        """Record the run and its steps as they are now, under ``name``."""
        rollback.checkpoint(self, name, description, tags)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Named checkpoints, oldest first."""
        return rollback.checkpoints(self)

    def rollback(self, name: str) -> RollbackReport:
        """Return the run to checkpoint ``name``; what it replaces stays readable
        (``discarded``). The summed cost is not rolled back: it is money spent."""
        return rollback.rollback(self, name)

    def discarded(self) -> dict[int, dict[str, dict[str, Any]]]:
        """Step records replaced by each rollback: ``{rollback n: {step_id: record}}``."""
        return rollback.discarded(self)

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
                    out.append(StepEvent(key=op.key, run_id=self.run_id, step_id=sid,
                                         old_status=old,
                                         new_status=new,
                                         attempts=int(op.value.get("attempts") or 0)))
        if self.record.status != self._seen_status:
            out.append(RunEvent(key=keys.run(self.run_id), run_id=self.run_id,
                                old_status=self._seen_status,
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
