"""Steps: the ``@step`` decorator, the context-manager form, and what a step's body
reports while it runs (progress, cursor, cost).

Why a step is recorded before its body runs: a step found ``running`` after a
crash was interrupted, and the resume rules (README's resume table) decide from that record
whether it runs again from its cursor (idempotent) or waits for the
orchestrator (``needs_attention``). Its completion, the run's summary and the
run index move in one commit.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, overload

from ..errors import LeaseLostError, StepNeedsAttentionError, WorkflowError
from . import keys
from .records import Cost, StepRecord, StepStatus, describe_error, utcnow

if TYPE_CHECKING:
    from .run import Run

__all__ = ["StepContext", "current_run", "current_run_var", "current_step", "step"]

_F = TypeVar("_F", bound=Callable[..., Any])

#: the run and the step the calling code is inside (set by ``with run:`` and by a step)
current_run_var: contextvars.ContextVar[Run | None] = contextvars.ContextVar(
    "walsync_run", default=None
)
_current_step: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar(
    "walsync_step", default=None
)


def current_run() -> Run:
    """The run the calling code is inside (``with run:``)."""
    run = current_run_var.get()
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
def step(fn: _F, *, name: str | None = None, idempotent: bool = True) -> _F: ...


@overload
def step(
    fn: None = None, *, name: str | None = None, idempotent: bool = True
) -> Callable[[_F], _F]: ...


def step(
    fn: _F | None = None, *, name: str | None = None, idempotent: bool = True
) -> Any:
    """Decorate a function so each call inside a run is a recorded step.

    The step id is ``name`` (default: the function's qualified name), with
    ``#2``, ``#3``… for later calls in the same run, so a loop's iterations are
    distinct steps as long as the orchestrator calls them in the same order.
    On an ``async def`` the wrapper is a coroutine function: awaited inside an
    async run (``async with``), it records the awaited result, and the id is
    taken when the coroutine starts.
    """

    def decorate(f: _F) -> _F:
        base = name or f.__qualname__
        if inspect.iscoroutinefunction(f):
            # awaited and recorded in an async run (engine/workflow/aio.py)
            from .aio import async_step_wrapper

            return async_step_wrapper(f, base, idempotent)  # type: ignore[return-value]

        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            run = current_run()
            return run.step(run.next_step_id(base), f, *args, idempotent=idempotent, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate(fn) if fn is not None else decorate


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
        if self.done:
            # already a success (found so, or completed in this block): an exception
            # later in the block is the caller's, and the step stays what it is
            return
        if exc is None:
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
        """Count usage, durable when this returns: the step's progress record carries
        the cost spent so far and the run's summed cost moves in the same commit.

        Why a commit of its own: the money is spent once the model API answered,
        whether or not the step lives to report progress; a crash before the next
        progress would otherwise drop it from the totals (the resumed attempt does
        not spend it again, so the run's cost would read low for good).
        """
        cost = Cost(tokens_in, tokens_out, usd, dict(counters))
        if not cost:
            return
        if self.done or self._token is None:
            # not inside the running body (already succeeded, or not entered yet):
            # counted with the step's next commit
            self._unflushed.add(cost)
            return
        rec, run = self.record, self.run
        with run._undo_on_error(rec):
            rec.updated_at = utcnow()
            run._add_cost(rec, self._unflushed)
            run._add_cost(rec, cost)
            with run._batch() as b:
                b.put(keys.step(run.run_id, self.step_id), rec.to_dict())
                run._write_run(b)
        self._unflushed = Cost()
        run._version_from(b)

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
