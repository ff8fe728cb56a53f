"""The sync workflow API's shape over the async one, so one suite holds both to its rules.

In the async mode of a parametrised suite, ``Workflows.run`` and ``get_run``
return an ``AsyncDrivenRun``: each call the test makes (``with run:``,
``run.step``, ``run.begin``, ``ctx.progress``...) is the async form, awaited
on one event loop, and every step body is handed over as an ``async def``.
``step`` is ``@step`` applied to an ``async def`` twin of the decorated
function. All coroutines run in one Context, as the statements of one
``async with`` block would, so the run's context variables carry from one
call to the next.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from walsync.engine.workflow import AsyncRun, AsyncStepContext, Run, Workflows
from walsync.engine.workflow import step as real_step
from walsync.engine.workflow.run import deferred_commits_var

_T = TypeVar("_T")


class Driver:
    """One loop, one Context: awaits the test's calls one after the other."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.context = contextvars.copy_context()

    def __call__(self, awaitable: Awaitable[_T]) -> _T:
        task = self.loop.create_task(_awaited(awaitable), context=self.context)
        return self.loop.run_until_complete(task)

    def close(self) -> None:
        self.loop.close()


async def _awaited(awaitable: Awaitable[_T]) -> _T:
    return await awaitable


def async_twin(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as an ``async def`` that yields to the loop once before running it."""

    @functools.wraps(fn)
    async def twin(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0)
        return fn(*args, **kwargs)

    return twin


class AsyncDrivenStep:
    def __init__(self, ctx: AsyncStepContext, drive: Driver) -> None:
        self._ctx = ctx
        self._drive = drive

    def __enter__(self) -> AsyncDrivenStep:
        self._drive(self._ctx.__aenter__())
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._drive(self._ctx.__aexit__(exc_type, exc, tb))

    def progress(self, fraction: float, cursor: Any = None) -> None:
        self._drive(self._ctx.progress(fraction, cursor))

    def complete(self, output: Any) -> None:
        self._drive(self._ctx.complete(output))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


class AsyncDrivenRun:
    def __init__(self, run: Run, drive: Driver) -> None:
        self._arun = AsyncRun(run)
        self._run = run
        self._drive = drive

    def __enter__(self) -> AsyncDrivenRun:
        self._drive(self._arun.__aenter__())
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._drive(self._arun.__aexit__(exc_type, exc, tb))

    def step(self, step_id: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self._drive(self._arun.step(step_id, async_twin(fn), *args, **kwargs))

    def begin(self, step_id: str, **kwargs: Any) -> AsyncDrivenStep:
        return AsyncDrivenStep(self._arun.begin(step_id, **kwargs), self._drive)

    def start(self) -> None:
        self._drive(self._arun.start())

    def pause(self, reason: str | None = None) -> None:
        self._drive(self._arun.pause(reason))

    def complete(self) -> None:
        self._drive(self._arun.complete())

    def fail(self, exc: BaseException) -> None:
        self._drive(self._arun.fail(exc))

    def cancel(self) -> None:
        self._drive(self._arun.cancel())

    def set_metadata(self, **values: Any) -> None:
        self._drive(self._arun.set_metadata(**values))

    def resolve(self, step_id: str, action: str, output: Any = None) -> None:
        self._drive(self._arun.resolve(step_id, action, output))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._run, name)


def async_step_decorator(drive: Driver) -> Callable[..., Any]:
    """``step`` whose decorated function is an ``async def`` twin, called through ``drive``."""

    def step(fn: Callable[..., Any] | None = None, *, name: str | None = None,
             idempotent: bool = True) -> Any:
        def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
            recorded = real_step(async_twin(f), name=name, idempotent=idempotent)

            @functools.wraps(f)
            def call(*args: Any, **kwargs: Any) -> Any:
                return drive(recorded(*args, **kwargs))

            return call

        return decorate(fn) if fn is not None else decorate

    return step


@functools.cache
def _originals() -> tuple[Callable[..., Run], Callable[..., Run]]:
    return Workflows.run, Workflows.get_run


def drive_async(monkeypatch: pytest.MonkeyPatch, module: Any) -> Iterator[Driver]:
    """Switch ``module``'s suite to the async API for one test (a fixture's body)."""
    drive = Driver()
    orig_run, orig_get_run = _originals()

    def run(self: Workflows, *args: Any, **kwargs: Any) -> Any:
        if deferred_commits_var.get() is not None:  # Workflows.arun's own call
            return orig_run(self, *args, **kwargs)
        opened = drive(self.arun(*args, **kwargs))
        return AsyncDrivenRun(opened.run, drive)

    def get_run(self: Workflows, run_id: str) -> Any:
        return AsyncDrivenRun(orig_get_run(self, run_id), drive)

    monkeypatch.setattr(Workflows, "run", run)
    monkeypatch.setattr(Workflows, "get_run", get_run)
    monkeypatch.setattr(module, "step", async_step_decorator(drive))
    try:
        yield drive
    finally:
        drive.close()
