"""The awaitable workflow layer: ``async with`` runs, awaited steps, ``@step`` on ``async def``.

Why it has the sync layer's semantics exactly: it runs the sync layer's own
code. Each awaited form (start a run, begin, progress, complete a step, end
the run) calls its sync twin for one synchronous stretch during which the
run's commits are queued rather than waited for (``deferred_commits_var``,
engine/aio.py), then awaits them. The records, the resume rules, the
events and the lease checks are the sync code's; only the waiting differs.

Why concurrent steps of one run (``asyncio.gather``) record correctly. Each
stretch runs on the loop's thread with no await inside it, so the stretches
of several tasks never interleave; a commit's LSN and version are known as
soon as it is queued, so the next stretch writes the run record expecting
that version (no ConflictError between a run's own tasks), and the records
of several tasks share one group commit. Step ids are fixed by the caller
(``run.step("id", ...)``) or, for ``@step``, by the order in which the calls
start, which is the order of ``gather``'s arguments.

What a cancellation does. Cancelling a task that awaits a commit does not
cancel the commit (engine/aio.py): the state in memory and on disk agree. A
step body cancelled (``CancelledError``) is recorded ``cancelled``, as a
BaseException leaving a sync step is, and runs again on resume; the run is
left ``running`` (resumable), as after a KeyboardInterrupt. A step cancelled
while its completion is awaited is a success (the completion is queued: it
lands), and one cancelled while its start is awaited is left ``running``, as
a crash leaves it; either way the task is no longer inside the step.

What a failure to write does. Checks (a conflict, an output that cannot be
stored, a lost lease) raise before anything is queued, and the sync code puts
its records back. A failed write poisons the store (engine/health.py): the
awaited form raises the store's error, and the Run in memory, which already
counts the refused change, is not to be driven further; reopen the store.

Threads: an AsyncRun belongs to one event loop; its tasks may share it.
Synchronous step callables run on the loop's thread (wrap a blocking one in
``asyncio.to_thread`` yourself). Reads (``run.steps``, ``output``,
``snapshot``) stay synchronous, as the store's do.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..aio import DeferredCommits, gate_open
from .records import Cost, RunRecord, StepRecord
from .rollback import RollbackReport
from .run import Run, deferred_commits_var
from .step import StepContext, _current_step, current_run, current_run_var, current_step

if TYPE_CHECKING:
    from .leases import LeaseLike
    from .workflows import Workflows

__all__ = ["AsyncRun", "AsyncStepContext", "RunOpener", "async_step_wrapper",
           "current_async_step", "run_async_step"]

_T = TypeVar("_T")


async def _deferred(run_store: Any, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run the sync ``fn`` with the run's commits queued, then await them."""
    await gate_open(run_store)
    commits = DeferredCommits(run_store)
    token = deferred_commits_var.set(commits)
    try:
        result = fn(*args, **kwargs)
    finally:
        deferred_commits_var.reset(token)
    if commits.pending:
        await commits.wait()
    return result


class AsyncRun:
    """A Run driven with ``async with``: ``await run.step(...)``, ``async with run.begin(...)``.

    ``run`` is the Run itself (records, outputs, checkpoints, rollback: the
    synchronous API for what is rare or only reads).
    """

    def __init__(self, run: Run) -> None:
        self.run = run

    # -- what it reads -----------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def status(self) -> str:
        return self.run.status

    @property
    def record(self) -> RunRecord:
        return self.run.record

    @property
    def steps(self) -> dict[str, StepRecord]:
        return self.run.steps

    @property
    def cost(self) -> Cost:
        return self.run.cost

    @property
    def interrupted(self) -> list[tuple[str, str]]:
        return self.run.interrupted

    def output(self, step_id: str) -> Any:
        return self.run.output(step_id)

    def snapshot(self) -> dict[str, Any]:
        return self.run.snapshot()

    def ordered_steps(self) -> list[StepRecord]:
        return self.run.ordered_steps()

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> AsyncRun:
        try:
            await _deferred(self.run.store, self.run.__enter__)
        except BaseException:
            # the start stays queued (the run is running, as after a crash), but this
            # task, cancelled or refused, is not inside the run
            if self.run._token is not None:
                current_run_var.reset(self.run._token)
                self.run._token = None
            raise
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        await _deferred(self.run.store, self.run.__exit__, exc_type, exc, tb)

    async def start(self) -> None:
        await _deferred(self.run.store, self.run.start)

    async def complete(self) -> None:
        await _deferred(self.run.store, self.run.complete)

    async def fail(self, exc: BaseException) -> None:
        await _deferred(self.run.store, self.run.fail, exc)

    async def pause(self, reason: str | None = None) -> None:
        await _deferred(self.run.store, self.run.pause, reason)

    async def cancel(self) -> None:
        await _deferred(self.run.store, self.run.cancel)

    async def set_metadata(self, **values: Any) -> None:
        await _deferred(self.run.store, self.run.set_metadata, **values)

    async def resolve(self, step_id: str, action: str, output: Any = None) -> None:
        await _deferred(self.run.store, self.run.resolve, step_id, action, output)

    async def set_lease(self, lease: tuple[str, int] | LeaseLike | str,
                        token: int | None = None) -> None:
        await _deferred(self.run.store, self.run.set_lease, lease, token)

    async def checkpoint(self, name: str, description: str = "",
                         tags: Sequence[str] = ()) -> None:
        """``Run.checkpoint``, its commit awaited."""
        await _deferred(self.run.store, self.run.checkpoint, name, description, tags)

    async def rollback(self, name: str) -> RollbackReport:
        """``Run.rollback``, its commits awaited."""
        return await _deferred(self.run.store, self.run.rollback, name)

    # -- steps -------------------------------------------------------------------

    async def step(
        self,
        step_id: str,
        fn: Callable[..., Any],
        *args: Any,
        idempotent: bool = True,
        inputs: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` (awaited if it returns an awaitable) as step
        ``step_id`` once; afterwards return its recorded output."""
        async with self.begin(step_id, idempotent=idempotent, inputs=inputs) as ctx:
            if not ctx.done:
                output = fn(*args, **kwargs)
                if inspect.isawaitable(output):
                    output = await output
                await ctx.complete(output)
        return ctx.output

    def begin(self, step_id: str, *, idempotent: bool = True,
              inputs: Any = None) -> AsyncStepContext:
        """``async with run.begin("s") as s: if not s.done: await s.complete(x)``."""
        return AsyncStepContext(self.run.begin(step_id, idempotent=idempotent, inputs=inputs))


class AsyncStepContext:
    """One execution of a step in an async run: progress and completion are awaited."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx

    @property
    def step_id(self) -> str:
        return self.ctx.step_id

    @property
    def done(self) -> bool:
        return self.ctx.done

    @property
    def output(self) -> Any:
        return self.ctx.output

    @property
    def cursor(self) -> Any:
        return self.ctx.cursor

    @property
    def attempt(self) -> int:
        return self.ctx.attempt

    @property
    def record(self) -> StepRecord:
        return self.ctx.record

    async def __aenter__(self) -> AsyncStepContext:
        try:
            await _deferred(self.ctx.run.store, self.ctx.__enter__)
        except BaseException:
            # the step stays 'running', as interrupted: the resume rules apply to it
            if self.ctx._token is not None:
                _current_step.reset(self.ctx._token)
                self.ctx._token = None
            raise
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        await _deferred(self.ctx.run.store, self.ctx.__exit__, exc_type, exc, tb)

    async def progress(self, fraction: float, cursor: Any = None) -> None:
        """Durably record partial progress (0..1) and a resume cursor, awaited."""
        await _deferred(self.ctx.run.store, self.ctx.progress, fraction, cursor)

    async def add_cost(self, tokens_in: int = 0, tokens_out: int = 0, usd: float = 0.0,
                       **counters: float) -> None:
        """Count usage, as ``StepContext.add_cost`` does (its commit, if any, awaited)."""
        await _deferred(self.ctx.run.store, self.ctx.add_cost, tokens_in, tokens_out, usd,
                        **counters)

    async def complete(self, output: Any) -> None:
        """Record the output and mark the step ``success`` with the run's summary, awaited."""
        await _deferred(self.ctx.run.store, self.ctx.complete, output)


def current_async_step() -> AsyncStepContext:
    """The step the calling coroutine is inside, for ``await ...progress()``."""
    return AsyncStepContext(current_step())


async def run_async_step(base: str, fn: Callable[..., Awaitable[Any]], idempotent: bool,
                         args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What ``@step`` on an ``async def`` does when its coroutine starts."""
    run = current_run()
    return await AsyncRun(run).step(run.next_step_id(base), fn, *args,
                                    idempotent=idempotent, **kwargs)


def async_step_wrapper(fn: Callable[..., Awaitable[Any]], base: str,
                       idempotent: bool) -> Callable[..., Awaitable[Any]]:
    """``@step`` on an ``async def``: a coroutine function again (so orchestrators that
    ask ``inspect.iscoroutinefunction`` still await it)."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return await run_async_step(base, fn, idempotent, args, kwargs)

    return wrapper


class RunOpener:
    """``Workflows.arun``: awaited, the run (created or found); used with ``async with``,
    the run started and, on leaving, completed, failed or paused as ``with run:`` does."""

    def __init__(self, wf: Workflows, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._wf = wf
        self._args = args
        self._kwargs = kwargs
        self._run: AsyncRun | None = None

    async def _open(self) -> AsyncRun:
        run = await _deferred(self._wf.store, self._wf.run, *self._args, **self._kwargs)
        return AsyncRun(run)

    def __await__(self) -> Generator[Any, None, AsyncRun]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncRun:
        self._run = await self._open()
        return await self._run.__aenter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        assert self._run is not None
        await self._run.__aexit__(exc_type, exc, tb)
