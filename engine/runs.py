"""The records of the workflow layer and the keys they live under. Pure.

    runs/<run_id>                          the run record (small: no step list)
    runs/<run_id>/steps/<step_id>          one record per step
    runs/<run_id>/outputs/<step_id>/<n>    a step output too large to keep inline
                                           (attempt n; never overwritten); after
                                           rollback g it is <n>-<g>, because a
                                           step re-run after a rollback counts its
                                           attempts again while the discarded
                                           record still points at its own output
    runs/<run_id>/checkpoints/<name>       a named checkpoint: the run and step
                                           records as they were
    runs/<run_id>/discarded/<n>/<step_id>  step records a rollback replaced
    index/runs/<run_id>                    status, workflow and times, for listing
                                           runs without reading their steps

A step's completion writes its step key, the run key and the index key in one
commit, so a checkpoint costs what changed, not the size of the run.
"""

from __future__ import annotations

import datetime as dt
import traceback
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

__all__ = [
    "RUN_STATUSES",
    "STEP_STATUSES",
    "Cost",
    "RunRecord",
    "RunStatus",
    "StepRecord",
    "StepStatus",
    "describe_error",
    "keys",
    "utcnow",
]


class RunStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILURE = "failure"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
    NEEDS_ATTENTION = "needs_attention"


RUN_STATUSES = frozenset(s.value for s in RunStatus)
STEP_STATUSES = frozenset(s.value for s in StepStatus)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class keys:
    @staticmethod
    def run(run_id: str) -> str:
        return f"runs/{run_id}"

    @staticmethod
    def steps(run_id: str) -> str:
        return f"runs/{run_id}/steps/"

    @staticmethod
    def step(run_id: str, step_id: str) -> str:
        return f"runs/{run_id}/steps/{step_id}"

    @staticmethod
    def output(run_id: str, step_id: str, attempt: int, generation: int = 0) -> str:
        suffix = f"{attempt:06d}" if not generation else f"{attempt:06d}-{generation:06d}"
        return f"runs/{run_id}/outputs/{step_id}/{suffix}"

    @staticmethod
    def checkpoints(run_id: str) -> str:
        return f"runs/{run_id}/checkpoints/"

    @staticmethod
    def checkpoint(run_id: str, name: str) -> str:
        return f"runs/{run_id}/checkpoints/{name}"

    @staticmethod
    def discarded(run_id: str, rollback: int) -> str:
        return f"runs/{run_id}/discarded/{rollback:06d}/"

    @staticmethod
    def all_of_run(run_id: str) -> str:
        return f"runs/{run_id}/"

    INDEX = "index/runs/"

    @staticmethod
    def index(run_id: str) -> str:
        return f"index/runs/{run_id}"


@dataclass
class Cost:
    """Usage a step reports: tokens, money, and any named counters."""

    tokens_in: int = 0
    tokens_out: int = 0
    usd: float = 0.0
    counters: dict[str, float] = field(default_factory=dict)

    def add(self, other: Cost) -> None:
        self.tokens_in += other.tokens_in
        self.tokens_out += other.tokens_out
        self.usd += other.usd
        for name, value in other.counters.items():
            self.counters[name] = self.counters.get(name, 0) + value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any] | None) -> Cost:
        d = d or {}
        return Cost(int(d.get("tokens_in", 0)), int(d.get("tokens_out", 0)),
                    float(d.get("usd", 0.0)), dict(d.get("counters", {})))

    def __bool__(self) -> bool:
        return bool(self.tokens_in or self.tokens_out or self.usd or self.counters)


@dataclass
class StepRecord:
    step_id: str
    status: str = StepStatus.PENDING.value
    seq: int = 0
    idempotent: bool = True
    inputs: Any = None
    #: the output, when small enough to keep inline (see output_key)
    output: Any = None
    #: key of the output when it is stored apart; None when inline
    output_key: str | None = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    created_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    fraction: float = 0.0
    cursor: Any = None
    cost: dict[str, Any] = field(default_factory=dict)
    #: set when a step was found 'running' after a crash and is non-idempotent
    interrupted_at: dt.datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> StepRecord:
        if d.keys() <= _STEP_FIELDS:  # the usual case: no unknown keys to drop
            return StepRecord(**d)
        return StepRecord(**{k: v for k, v in d.items() if k in _STEP_FIELDS})


@dataclass
class RunRecord:
    run_id: str
    workflow: str
    workflow_version: str | int = 1
    schema_version: int = 1
    status: str = RunStatus.PENDING.value
    inputs: Any = None
    current_step: str | None = None
    progress: float = 0.0
    total_steps: int | None = None
    steps_done: int = 0
    error: dict[str, Any] | None = None
    created_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    restoration_count: int = 0
    last_restored_at: dt.datetime | None = None
    restoration_source: str | None = None
    #: the lease the run was last written under (holder node id and token), as its
    #: holder wrote it: it tells another host the run is leased and by whom, and is
    #: never a token to write with (a host writes with its own acquisition's only)
    owner_node: str | None = None
    lease_token: int | None = None
    cost: dict[str, Any] = field(default_factory=dict)
    max_retries: int = 0
    retries: int = 0
    rollbacks: int = 0
    next_seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RunRecord:
        return RunRecord(**{k: v for k, v in d.items() if k in _RUN_FIELDS})

    def index_entry(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "workflow": self.workflow,
            "updated_at": self.updated_at,
            "created_at": self.created_at,
            "retries_left": max(0, self.max_retries - self.retries),
        }


#: field names, computed once: from_dict runs for every step of a run loaded
_STEP_FIELDS = frozenset(f.name for f in fields(StepRecord))
_RUN_FIELDS = frozenset(f.name for f in fields(RunRecord))


def describe_error(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc))[-8000:],
    }
