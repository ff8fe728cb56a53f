"""Seeds of the crash suites, and the one-line command that replays a seeded run.

Every crash test draws its kill moments from one seed: ``WALSYNC_CRASH_SEED``
when set, else a fresh random one. A failure names the seed and the exact
command that runs the same test with it again, so a violation found once in
CI can be chased locally. (Thread and disk timing still vary between runs: a
seed replays the same choices, not necessarily the same interleaving.)
"""

from __future__ import annotations

import contextlib
import os
import random
import traceback
from collections.abc import Iterator

import pytest

SEED_VARIABLE = "WALSYNC_CRASH_SEED"


class CrashViolation(AssertionError):
    """A checker found a broken guarantee (or a child misbehaved) after a kill."""


def crash_seed() -> int:
    """WALSYNC_CRASH_SEED if set, else a fresh random seed (printed on failure)."""
    text = os.environ.get(SEED_VARIABLE, "").strip()
    if text:
        return int(text)
    return random.SystemRandom().randrange(1, 2**31)


def replay_command(seed: int, nodeid: str) -> str:
    """The shell line that runs test ``nodeid`` again with ``seed``."""
    return f"{SEED_VARIABLE}={seed} .venv/bin/python -m pytest '{nodeid}'"


def replay_header(seed: int, nodeid: str) -> str:
    return f"seed {seed}; replay: {replay_command(seed, nodeid)}"


@contextlib.contextmanager
def seeded(seed: int, nodeid: str) -> Iterator[None]:
    """Any error or failed assert in the block fails the test with the seed and the
    command that replays it on the first line."""
    try:
        yield
    except Exception:  # noqa: BLE001 - re-raised as a test failure that names the seed
        pytest.fail(f"{replay_header(seed, nodeid)}\n{traceback.format_exc()}", pytrace=False)
