"""Kill points: a crash child SIGKILLs itself the n-th time it reaches a chosen point.

Installed inside a forked child (never in the test process). A point is a
call into one of the engine's seams, named ``<hook>@<caller>``:

* ``fs.<function>@<caller>``: every function of ``engine._fs``, the one module
  that writes, syncs, renames or removes; ``<caller>`` is the qualified name
  of the first frame outside it, so the rename inside ``atomic_write`` called
  by ``write_store_file`` is ``fs.rename@write_store_file``;
* ``lmdb.<method>@<caller>``: ``SnapshotStore.sync`` (a checkpoint's first
  half), ``apply`` (a commit reaching LMDB) and ``apply_puts`` (replay);
* ``failpoint.<name>``: each named failpoint of ``engine._failpoints``.

Points are found by running the engine, not listed by hand: a child that
``discover``s reports the first hit of each point in each phase of its life
(``H <point> <phase>``: ``open``, ``run`` or ``close``) and, when it ends
normally, how often each was hit (``E <point> <phase> <count>``). A new file
operation in the engine is thus swept without touching the tests.

A :class:`KillPlan` names the point (a bare hook such as ``lmdb.apply_puts``
matches every caller), ``before`` or ``after`` the call, and the ``nth`` hit
counted from when the plan is armed: on the ``entry``-th entry into its
phase, or for ``run`` after ``after_acks`` acknowledged commits. Workloads
name their own phases (the workflow child enters ``begin`` before each step,
``checkpoint`` before each checkpoint ...). At the kill the child reports
``K <point> <when>`` and sends itself SIGKILL.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

WHEN = ("before", "after")
PHASES = ("open", "run", "close")


@dataclass(frozen=True)
class KillPlan:
    point: str
    when: str = "before"
    nth: int = 1
    phase: str = "run"
    after_acks: int = 0
    entry: int = 1

    def matches(self, point: str) -> bool:
        return self.point == point or ("@" not in self.point
                                       and point.startswith(self.point + "@"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> KillPlan | None:
        return None if data is None else cls(**data)


def engine_failpoints(repo_root: Path) -> tuple[str, ...]:
    """Every named failpoint the engine's code hits (``_failpoints.hit("name")``)."""
    names: set[str] = set()
    for path in (repo_root / "engine").glob("*.py"):
        names.update(re.findall(r"_failpoints\.hit\(\s*\"([^\"]+)\"", path.read_text()))
    return tuple(sorted(names))


def _caller() -> str:
    """The qualified name of the first frame outside this module and engine._fs."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__") in (__name__, "walsync.engine._fs"):
        frame = frame.f_back  # type: ignore[assignment]
    return frame.f_code.co_qualname if frame is not None else "?"


class KillPoints:
    """The hooks of one child. ``emit`` sends a report line to the parent."""

    def __init__(
        self, emit: Callable[[str], None], plan: KillPlan | None, *, discover: bool = False
    ) -> None:
        self._emit = emit
        self.plan = plan
        self.discover = discover
        self.phase = "open"
        self._armed = False
        self._hits = 0
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._entries: dict[str, int] = {}

    # -- the child's life --------------------------------------------------------

    def enter(self, phase: str) -> None:
        """The child moves to ``phase``; a plan for it is armed (``run`` waits for acks)."""
        self.phase = phase
        entries = self._entries[phase] = self._entries.get(phase, 0) + 1
        plan = self.plan
        if plan is not None and plan.phase == phase and entries == plan.entry and (
                phase != "run" or plan.after_acks == 0):
            self._armed = True

    @property
    def armed(self) -> bool:
        return self._armed

    def acked(self, total: int) -> None:
        """``total`` commits have been acknowledged so far."""
        plan = self.plan
        if plan is not None and plan.phase == "run" == self.phase and total == plan.after_acks:
            self._armed = True

    def report_counts(self) -> None:
        """At a normal end: how often each point was reached, per phase."""
        if self.discover:
            for (point, phase), count in sorted(self._counts.items()):
                self._emit(f"E {point} {phase} {count}")

    # -- the hooks -----------------------------------------------------------------

    def install(self) -> None:
        """Wrap the engine's seams in this process (a forked child, never the parent)."""
        from walsync.engine import _failpoints, _fs
        from walsync.engine.snapshot import SnapshotStore

        for name in _fs.__all__:
            fn = getattr(_fs, name)
            if callable(fn):
                setattr(_fs, name, self._wrap(f"fs.{name}", fn))
        for name in ("sync", "apply_puts"):
            setattr(SnapshotStore, name, self._wrap(f"lmdb.{name}", getattr(SnapshotStore, name)))

        def hit(name: str) -> None:
            self._reach(f"failpoint.{name}", "before")

        _failpoints.hit = hit
        _failpoints.ACTIVE = True

    def _wrap(self, hook: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            point = f"{hook}@{_caller()}"
            n = self._reach(point, "before")
            try:
                return fn(*args, **kwargs)
            finally:  # "after" a call that raised is a kill point too
                if n:
                    self._reach_after(point, n)

        wrapper.__name__ = getattr(fn, "__name__", hook)
        wrapper.__doc__ = fn.__doc__
        return wrapper

    def _reach(self, point: str, when: str) -> int:
        """Count a hit; kill if the plan says so. Returns the hit's number while armed."""
        plan = self.plan
        with self._lock:
            key = (point, self.phase)
            seen = self._counts.get(key, 0)
            self._counts[key] = seen + 1
            n = 0
            if self._armed and plan is not None and plan.matches(point):
                self._hits += 1
                n = self._hits
        if self.discover and not seen:
            self._emit(f"H {point} {key[1]}")
        if n and plan is not None and n == plan.nth and plan.when == when:
            self._kill(point, when)
        return n

    def _reach_after(self, point: str, n: int) -> None:
        plan = self.plan
        if plan is not None and plan.when == "after" and n == plan.nth:
            self._kill(point, "after")

    def _kill(self, point: str, when: str) -> None:
        self._emit(f"K {point} {when}")
        os.kill(os.getpid(), signal.SIGKILL)
