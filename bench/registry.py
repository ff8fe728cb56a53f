"""The case registry and the interleaving helpers every case uses.

Adding a case: write a function ``(ctx: Context) -> CaseResult`` in
``bench/cases.py`` (or any module imported by ``bench.run``) and decorate it
with ``@case("name", goal="...")``. Cases run in registration order.
"""

from __future__ import annotations

import itertools
import os
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import Target, Throughput, measure_latency

__all__ = [
    "CASES",
    "Case",
    "CaseResult",
    "Context",
    "case",
    "describe",
    "interleaved_latency",
    "interleaved_throughput",
]


@dataclass
class Context:
    work: Path  # a fresh directory on the disk being measured
    quick: bool
    engine_ok: bool
    engine_error: str | None
    shared: dict[str, Any] = field(default_factory=dict)  # cases may hand data on
    _dirs: itertools.count[int] = field(default_factory=itertools.count)

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full

    def subdir(self, name: str) -> Path:
        """A new, empty directory for one target."""
        path = self.work / f"{next(self._dirs):03d}-{name}"
        path.mkdir(parents=True)
        return path


@dataclass
class CaseResult:
    """What a case reports. ``fields`` become the JSON line."""

    fields: dict[str, Any]
    #: goal name -> met? (None: not measured, e.g. the engine did not import)
    checks: dict[str, bool | None] = field(default_factory=dict)
    #: one line for the human summary: (walsync figure, baseline figures)
    headline: tuple[str, str] = ("", "")
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class Case:
    name: str
    goal: str
    func: Callable[[Context], CaseResult]


CASES: dict[str, Case] = {}


def case(name: str, goal: str) -> Callable[[Callable[[Context], CaseResult]],
                                           Callable[[Context], CaseResult]]:
    def register(func: Callable[[Context], CaseResult]) -> Callable[[Context], CaseResult]:
        if name in CASES:
            raise ValueError(f"duplicate case {name!r}")
        CASES[name] = Case(name, goal, func)
        return func

    return register


def describe(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" at {os.path.basename(last[0].filename)}:{last[0].lineno}" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


def interleaved_latency(
    targets: Mapping[str, Target], n: int, rounds: int, warmup: int,
    errors: dict[str, str], initial_warmup: int = 0,
) -> dict[str, list[int]]:
    """Latency samples (ns) per target, measured in alternating rounds.

    Every target gets ``n`` samples, ``n / rounds`` per round, each round after
    its own ``warmup`` ops (plus ``initial_warmup`` before the first); the order
    of targets rotates every round, so slow drifts of a noisy disk hit every
    target alike. A target that raises is
    dropped (its error is put in ``errors``) and the others carry on.
    """
    names = list(targets)
    samples: dict[str, list[int]] = {name: [] for name in names}
    next_i = dict.fromkeys(names, 0)
    per_round = [n // rounds + (1 if r < n % rounds else 0) for r in range(rounds)]
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if name in errors:
                continue
            w = warmup + (initial_warmup if r == 0 else 0)
            try:
                got = measure_latency(targets[name].op, per_round[r], w, next_i[name])
            except Exception as exc:  # noqa: BLE001 - reported in the case's JSON line
                errors[name] = describe(exc)
                continue
            samples[name].extend(got)
            next_i[name] += per_round[r] + w
    return {k: v for k, v in samples.items() if k not in errors}


def interleaved_throughput(
    runners: dict[str, Callable[[int], Throughput]], rounds: int, errors: dict[str, str],
) -> dict[str, list[float]]:
    """Ops/s per runner and round; runners alternate, order rotating each round.

    ``runners[name](round)`` runs one timed window and returns its Throughput.
    """
    names = list(runners)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if name in errors:
                continue
            try:
                rates[name].append(runners[name](r).per_s)
            except Exception as exc:  # noqa: BLE001 - reported in the case's JSON line
                errors[name] = describe(exc)
    return {k: v for k, v in rates.items() if k not in errors}
