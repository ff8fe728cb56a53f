"""The workflow layer's keys: the one place that spells and parses them. Pure.

Every run lives in the reserved namespace (engine/keyspace.py), which user keys
cannot enter, so a user's ``runs/1`` is never taken for a run::

    .walsync/runs/<run_id>                          the run record (small: no step list)
    .walsync/runs/<run_id>/steps/<step_id>          one record per step
    .walsync/runs/<run_id>/outputs/<step_id>/<n>    a step output too large to keep
                                                    inline (attempt n; never
                                                    overwritten); after rollback g
                                                    it is <n>-<g>, because a step
                                                    re-run after a rollback counts
                                                    its attempts again while the
                                                    discarded record still points
                                                    at its own output
    .walsync/runs/<run_id>/checkpoints/<name>       a named checkpoint: the run and
                                                    step records as they were
    .walsync/runs/<run_id>/discarded/<n>/<step_id>  step records rollback n replaced
    .walsync/index/runs/<run_id>                    status, workflow and times, for
                                                    listing runs without their steps

Run ids, step ids and checkpoint names are non-empty and hold no ``/``
(the workflow layer refuses others), so the segment after ``runs/`` is the
run id, and everything under ``.walsync/runs/<run_id>/`` is the run's.

The **legacy spelling** is the same grammar without the namespace
(``runs/<run_id>...``, ``index/runs/<run_id>``): walsync wrote runs there
before the namespace existed. Such keys are user keys now; the workflow layer
reads a run there only when its record has a run record's shape, and moves it
into the namespace (``translate``) when this host writes to it
(engine/workflow/legacy.py). The sync server recognises both spellings as a
run's keys for fencing while hosts that still write the legacy spelling may
push (``run_of``, twin of the SQL ``walsync.run_of``; ``record_keys``, twin of
``walsync.run_record_keys``; tests/workflow/test_keys_sql.py holds them to
these functions).
"""

from __future__ import annotations

from typing import Final

from ..keyspace import RESERVED_PREFIX

__all__ = [
    "CURRENT",
    "INDEX",
    "LEGACY",
    "RUNS",
    "SUBTREES",
    "Grammar",
    "all_of_run",
    "check_id",
    "checkpoint",
    "checkpoints",
    "discarded",
    "discarded_all",
    "index",
    "output",
    "record_keys",
    "run",
    "run_of",
    "step",
    "steps",
    "translate",
]

#: the kinds of key under a run's record key; each is a prefix ending in '/'
SUBTREES: Final = ("steps/", "outputs/", "checkpoints/", "discarded/")


class Grammar:
    """The run-key grammar under one root: the namespace, or "" (legacy)."""

    __slots__ = ("INDEX", "RUNS", "root")

    def __init__(self, root: str) -> None:
        self.root = root
        #: every run's keys start with this (its index entry excepted)
        self.RUNS = f"{root}runs/"
        #: every run's index entry starts with this
        self.INDEX = f"{root}index/runs/"

    def run(self, run_id: str) -> str:
        return self.RUNS + run_id

    def steps(self, run_id: str) -> str:
        return f"{self.RUNS}{run_id}/steps/"

    def step(self, run_id: str, step_id: str) -> str:
        return f"{self.RUNS}{run_id}/steps/{step_id}"

    def output(self, run_id: str, step_id: str, attempt: int, generation: int = 0) -> str:
        suffix = f"{attempt:06d}" if not generation else f"{attempt:06d}-{generation:06d}"
        return f"{self.RUNS}{run_id}/outputs/{step_id}/{suffix}"

    def checkpoints(self, run_id: str) -> str:
        return f"{self.RUNS}{run_id}/checkpoints/"

    def checkpoint(self, run_id: str, name: str) -> str:
        return f"{self.RUNS}{run_id}/checkpoints/{name}"

    def discarded(self, run_id: str, rollback: int) -> str:
        """The prefix of what rollback ``rollback`` of the run replaced."""
        return f"{self.RUNS}{run_id}/discarded/{rollback:06d}/"

    def discarded_all(self, run_id: str) -> str:
        return f"{self.RUNS}{run_id}/discarded/"

    def all_of_run(self, run_id: str) -> str:
        """The prefix of every key under the run's record key."""
        return f"{self.RUNS}{run_id}/"

    def subtrees(self, run_id: str) -> list[str]:
        """The prefixes of the run's steps, outputs, checkpoints and discarded records."""
        return [f"{self.RUNS}{run_id}/{kind}" for kind in SUBTREES]

    def index(self, run_id: str) -> str:
        return self.INDEX + run_id

    def run_id_of(self, key: str) -> str | None:
        """The run ``key`` belongs to in this spelling (its record, anything under it,
        or its index entry), or None."""
        for prefix in (self.RUNS, self.INDEX):
            if key.startswith(prefix):
                return key[len(prefix):].split("/", 1)[0]
        return None

    def step_id_of(self, run_id: str, key: str) -> str | None:
        """The step of a step key of ``run_id`` in this spelling, or None."""
        prefix = self.steps(run_id)
        return key[len(prefix):] if key.startswith(prefix) else None

    def __repr__(self) -> str:
        return f"Grammar({self.root!r})"


#: the spelling walsync writes
CURRENT: Final = Grammar(RESERVED_PREFIX)
#: the spelling of walsync before the reserved namespace (read, moved, never written)
LEGACY: Final = Grammar("")

RUNS: Final = CURRENT.RUNS
INDEX: Final = CURRENT.INDEX
run = CURRENT.run
steps = CURRENT.steps
step = CURRENT.step
output = CURRENT.output
checkpoints = CURRENT.checkpoints
checkpoint = CURRENT.checkpoint
discarded = CURRENT.discarded
discarded_all = CURRENT.discarded_all
all_of_run = CURRENT.all_of_run
index = CURRENT.index


def run_of(key: str) -> str | None:
    """The run whose lease fences writes to ``key``, as the sync server decides it
    (``walsync.run_of``): a run's key in either spelling, else None.

    An empty string is a run id too here (``runs/`` alone), as it is in SQL.
    """
    found = CURRENT.run_id_of(key)
    return found if found is not None else LEGACY.run_id_of(key)


def record_keys(run_id: str) -> tuple[str, str, str, str]:
    """The run's record and index keys in both spellings: the keys whose fencing
    tokens a new lease's token must exceed (``walsync.run_record_keys``)."""
    return (CURRENT.run(run_id), CURRENT.index(run_id), LEGACY.run(run_id),
            LEGACY.index(run_id))


def translate(key: str) -> str:
    """A run's key in the legacy spelling, spelled in the namespace."""
    if LEGACY.run_id_of(key) is None:
        raise ValueError(f"{key!r} is not a run's key in the legacy spelling")
    return RESERVED_PREFIX + key


def check_id(what: str, value: str) -> None:
    """Refuse a run id, step id or checkpoint name the grammar cannot hold: each is
    one key segment, so it is a non-empty string without ``/``."""
    if not isinstance(value, str) or not value or "/" in value:
        raise ValueError(f"{what} must be a non-empty string without '/', got {value!r}")
