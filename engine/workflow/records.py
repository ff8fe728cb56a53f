"""The records of the workflow layer (runs, steps, cost), and the checks that
stand between a stored value and a record. Pure.

Where each record lives: engine/workflow/keys.py. A step's completion writes
its step key, the run key and the index key in one commit, so a checkpoint
costs what changed, not the size of the run.

Why records are checked when read: a value under a run's key may have been
written by anything that could reach it (another walsync version, a foreign
host's pull, a tool around the store), and a record of the wrong shape must
stop the reader with a CorruptionError naming the key, never a TypeError deep
in the workflow layer. The checks look at the types of the fields the layer
uses, once per record read: a 1,000-step run costs about a millisecond more
to load.
"""

from __future__ import annotations

import datetime as dt
import traceback
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

from ..errors import CorruptionError

__all__ = [
    "RUN_STATUSES",
    "STEP_STATUSES",
    "Cost",
    "RunRecord",
    "RunStatus",
    "StepRecord",
    "StepStatus",
    "checked_checkpoint",
    "checked_index_entry",
    "checked_run",
    "checked_state",
    "checked_step",
    "describe_error",
    "looks_like_run",
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


# -- stored values to records ---------------------------------------------------------

#: a field's name -> the exact types its stored value may have (a bool is no int here:
#: cbor2 gives back the type that was stored, so a bool where a count belongs is damage)
_Types = dict[str, frozenset[type]]
_NONE: type = type(None)
_STR: frozenset[type] = frozenset({str})
_OPT_STR: frozenset[type] = frozenset({str, _NONE})
_INT: frozenset[type] = frozenset({int})
_OPT_INT: frozenset[type] = frozenset({int, _NONE})
_OPT_DT: frozenset[type] = frozenset({dt.datetime, _NONE})
_DICT: frozenset[type] = frozenset({dict})
_OPT_DICT: frozenset[type] = frozenset({dict, _NONE})
_NUMBER: frozenset[type] = frozenset({int, float})

#: the types of a run record's stored fields (fields of any type, e.g. ``inputs``, are
#: absent; unknown fields are ignored, as from_dict drops them)
_RUN_TYPES: _Types = {
    "run_id": _STR, "workflow": _STR, "workflow_version": frozenset({str, int}),
    "schema_version": _INT, "status": _STR, "current_step": _OPT_STR, "progress": _NUMBER,
    "total_steps": _OPT_INT, "steps_done": _INT, "error": _OPT_DICT, "created_at": _OPT_DT,
    "started_at": _OPT_DT, "updated_at": _OPT_DT, "completed_at": _OPT_DT, "metadata": _DICT,
    "restoration_count": _INT, "last_restored_at": _OPT_DT, "restoration_source": _OPT_STR,
    "owner_node": _OPT_STR, "lease_token": _OPT_INT, "cost": _DICT, "max_retries": _INT,
    "retries": _INT, "rollbacks": _INT, "next_seq": _INT,
}
_STEP_TYPES: _Types = {
    "step_id": _STR, "status": _STR, "seq": _INT, "idempotent": frozenset({bool}),
    "output_key": _OPT_STR, "error": _OPT_DICT, "attempts": _INT, "created_at": _OPT_DT,
    "started_at": _OPT_DT, "updated_at": _OPT_DT, "completed_at": _OPT_DT,
    "fraction": _NUMBER, "cost": _DICT, "interrupted_at": _OPT_DT,
}
_COST_TYPES: _Types = {"tokens_in": _INT, "tokens_out": _INT, "usd": _NUMBER,
                       "counters": _DICT}
_INDEX_TYPES: _Types = {"status": _STR, "workflow": _STR}
_CHECKPOINT_TYPES: _Types = {"name": _STR, "description": _STR, "tags": frozenset({list}),
                             "created_at": frozenset({dt.datetime}), "run": _DICT,
                             "steps": _DICT}

_HINT = ("the value was not written by the workflow layer (a write around it, or another "
         "program): remove the run's keys, or bring the run back from an export "
         "(`walsync import`) or from the server (`walsync restore`)")


def _problem(value: Any, types: _Types, required: tuple[str, ...]) -> str | None:
    """What is wrong with a stored record, or None."""
    if type(value) is not dict:
        return f"it is {type(value).__name__} ({value!r:.60}), not a map of fields"
    for name in required:
        if name not in value:
            return f"field {name!r} is missing"
    expected = types.get
    for name, item in value.items():
        allowed = expected(name)
        if allowed is not None and type(item) not in allowed:
            return f"field {name!r} is {type(item).__name__} ({item!r:.60})"
    cost = value.get("cost")
    if cost and "cost" in types:
        found = _problem(cost, _COST_TYPES, ())
        if found is not None:
            return f"its cost: {found}"
        counters = cost.get("counters") or {}
        if any(type(v) not in _NUMBER for v in counters.values()):
            return "its cost counters are not all numbers"
    return None


def _corrupt(what: str, key: str, problem: str) -> CorruptionError:
    return CorruptionError(f"{what} under key {key!r} is malformed: {problem}", hint=_HINT)


def checked_run(key: str, value: Any, run_id: str) -> RunRecord:
    """The run record stored under ``key`` (the record of ``run_id``), or CorruptionError."""
    problem = _problem(value, _RUN_TYPES, ("run_id", "workflow"))
    if problem is None and value["run_id"] != run_id:
        problem = f"it is the record of run {value['run_id']!r}"
    if problem is not None:
        raise _corrupt("the run record", key, problem)
    return RunRecord.from_dict(value)


def checked_step(key: str, value: Any, step_id: str) -> StepRecord:
    """The step record stored under ``key`` (step ``step_id``), or CorruptionError."""
    problem = _problem(value, _STEP_TYPES, ("step_id",))
    if problem is None and value["step_id"] != step_id:
        problem = f"it is the record of step {value['step_id']!r}"
    if problem is not None:
        raise _corrupt("the step record", key, problem)
    return StepRecord.from_dict(value)


def checked_state(key: str, value: Any, *, what: str = "the run record") -> dict[str, Any]:
    """A stored record as a map whose schema version can be read (migrations see the
    raw state before the records are checked), or CorruptionError."""
    problem = _problem(value, {"schema_version": _INT}, ())
    if problem is not None:
        raise _corrupt(what, key, problem)
    stored: dict[str, Any] = value
    return stored


def checked_index_entry(key: str, value: Any) -> dict[str, Any]:
    """A run's index entry (status and workflow, for listing), or CorruptionError."""
    problem = _problem(value, _INDEX_TYPES, ("status", "workflow"))
    if problem is not None:
        raise _corrupt("the run index entry", key, problem)
    entry: dict[str, Any] = value
    return entry


def checked_checkpoint(key: str, value: Any) -> dict[str, Any]:
    """A named checkpoint (its run and step records as maps), or CorruptionError."""
    problem = _problem(value, _CHECKPOINT_TYPES, tuple(_CHECKPOINT_TYPES))
    if problem is None and type(value["run"].get("status")) is not str:
        problem = "its run record has no status"
    if problem is None and not all(type(s) is str for s in value["tags"]):
        problem = "its tags are not all strings"
    if problem is not None:
        raise _corrupt("the checkpoint", key, problem)
    checkpoint: dict[str, Any] = value
    return checkpoint


def looks_like_run(value: Any, run_id: str) -> bool:
    """Whether a value under a legacy run key is a run record walsync wrote there (an
    old walsync's run), rather than a user's value: user keys own that spelling now."""
    return (type(value) is dict and value.get("run_id") == run_id
            and isinstance(value.get("workflow"), str) and isinstance(value.get("status"), str))
