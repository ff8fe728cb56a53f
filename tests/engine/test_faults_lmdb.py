"""LMDB's own I/O fails: libfiu injects the faults in C, where no Python seam reaches.

A child process (tests/engine/_fiu_child.py) runs under ``fiu-run -x`` (libfiu's
POSIX wrappers preloaded) and fails, one call at a time, the ``pwrite`` and
``writev`` calls LMDB makes while applying a commit (EIO, ENOSPC, EINTR, or a
short write), the ``fdatasync`` of a checkpoint, and the ``mmap`` of a map
growth. A first run counts those calls for every commit of its workload; the
second fails each of them in turn. The WAL's own writes go through the same
libc functions but are never hit: a fault is armed only inside LMDB's call.

Each case must end in a clean commit or in the project's error naming the
snapshot file (DiskFullError for ENOSPC), after which the store refuses writes
and still reads what was acknowledged (a failed meta-page write makes LMDB
refuse every later transaction of its handle, which must therefore be
reopened). Reopened here without faults, the store replays the WAL: every
acknowledged commit is there, and so is the one whose apply failed, since the
WAL had it durable before LMDB was asked.

Needs Debian's ``fiu-utils`` (which pulls ``libfiu0``); without ``fiu-run``
the test fails with that hint, it never skips.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.crash.summary import KillSummary
from tests.engine import _fiu_child
from tests.engine._faults import fast_dir
from walsync import engine
from walsync.engine import Store

REPO = Path(__file__).resolve().parents[2]
#: (stage, libfiu point) pairs counted and failed
POINTS = [
    ("apply", "posix/io/rw/pwrite"),
    ("apply", "posix/io/rw/writev"),
    ("checkpoint", "posix/io/sync/fdatasync"),
    ("grow", "posix/mm/mmap"),
]
#: how each counted call is failed, per stage: (point suffix, errno)
VARIANTS = {
    "apply": [("", errno.EIO), ("", errno.ENOSPC), ("", errno.EINTR), ("/reduce", 0)],
    "checkpoint": [("", errno.EIO), ("", errno.ENOSPC), ("", errno.EINTR)],
    "grow": [("", errno.ENOMEM), ("", errno.EIO)],
}
MIN_CASES = 100


def _fiu_run() -> str:
    path = shutil.which("fiu-run")
    if path is None:
        pytest.fail(
            "the LMDB fault tests need libfiu's fiu-run: install the Debian packages "
            "fiu-utils and libfiu0 (apt-get install -y fiu-utils)",
            pytrace=False,
        )
    return path


def _run_child(tmp: Path, name: str, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    plan, result = tmp / f"{name}.plan.json", tmp / f"{name}.result.json"
    plan.write_text(json.dumps(cases))
    proc = subprocess.run(
        [_fiu_run(), "-x", "-f", "", sys.executable, "-m", "tests.engine._fiu_child",
         str(plan), str(result)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, f"the fiu child failed ({proc.returncode}):\n{proc.stderr}"
    outcomes: list[dict[str, Any]] = json.loads(result.read_text())
    assert len(outcomes) == len(cases)
    return outcomes


def _state_after(commits: list[int]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for i in commits:
        for key, value in _fiu_child.ops_of(i):
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
    return state


def _plan(tmp: Path) -> list[dict[str, Any]]:
    """Count LMDB's calls per stage and commit, then one case per call and variant."""
    counting: list[dict[str, Any]] = [
        {"dir": str(tmp / f"count-{n}"), "stage": stage, "point": point, "errno": 0,
         "nth": 0, "commit": commit}
        for n, (stage, point, commit) in enumerate(
            (stage, point, commit) for stage, point in POINTS
            for commit in (range(_fiu_child.COMMITS) if stage != "checkpoint" else [0])
        )
    ]
    counts = _run_child(tmp, "count", counting)
    cases: list[dict[str, Any]] = []
    for base, counted in zip(counting, counts, strict=True):
        assert counted["raw_error"] is None, counted["raw_error"]
        assert counted["failed"] is None, counted
        for nth in range(1, counted["seen"] + 1):
            for suffix, code in VARIANTS[base["stage"]]:
                cases.append({**base, "dir": str(tmp / f"case-{len(cases)}"),
                              "point": base["point"] + suffix, "errno": code, "nth": nth})
    return cases


def _judge(case: dict[str, Any], out: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    snapshot = str(Path(case["dir"]) / "snapshot")
    if out["raw_error"]:
        problems.append(f"an error that is not the project's escaped:\n{out['raw_error']}")
    if out["close"] != "ok":
        problems.append(f"close: {out['close']}")
    if out["injected"] != 1:
        problems.append(f"the fault was injected {out['injected']} times")
    absorbed = case["errno"] == errno.EINTR
    if absorbed and out["failed"] is not None:
        problems.append(f"EINTR was not absorbed: {out['error_type']}: {out['error']}")
    acked: list[int] = out["acked"]
    failed = out["failed"]
    if failed is not None:
        full = case["errno"] == errno.ENOSPC
        expected = "DiskFullError" if full else "StorePoisonedError"
        if out["error_type"] != expected:
            problems.append(f"{out['error_type']} ({out['error']}), not {expected}")
        if snapshot not in out["error"]:
            problems.append(f"the error does not name the snapshot: {out['error']}")
        if out.get("later") != "refused":
            problems.append(f"a write after the failure was {out.get('later')}")
        reads = out.get("reads")
        state = _state_after(acked)
        wanted = {k: state.get(k) for k in ("k0", "k1", "b0", "b1", "b2")}
        if reads != wanted:
            problems.append(f"reads after the failure: {str(reads)[:200]}")
    elif case["stage"] != "checkpoint" and acked != list(range(_fiu_child.COMMITS)):
        problems.append(f"no commit failed but only {acked} were acknowledged")
    # reopened without faults: the WAL replays into LMDB
    expected_state = _state_after(acked + ([failed] if failed is not None and failed >= 0
                                           else []))
    with Store.open(case["dir"], segment_bytes=_fiu_child.SEGMENT_BYTES) as store:
        state = dict(store.scan())
        if state != expected_state:
            problems.append(f"after reopening: {sorted(state)} != {sorted(expected_state)}")
    report = engine.verify(case["dir"])
    if not report.ok:
        problems.append(f"verify: {report.damage}")
    return problems


@pytest.fixture
def fiu_dir(tmp_path: Path) -> Iterator[Path]:
    with fast_dir(tmp_path) as path:
        yield path


def test_faults_lmdb_every_write_sync_and_remap_fails_cleanly_and_replays(
    fiu_dir: Path, fault_summary: KillSummary
) -> None:
    _fiu_run()
    cases = _plan(fiu_dir)
    outcomes = _run_child(fiu_dir, "fail", cases)
    violations: list[str] = []
    kinds: dict[str, int] = {}
    for case, out in zip(cases, outcomes, strict=True):
        kind = f"{case['stage']} {case['point']}"
        kinds[kind] = kinds.get(kind, 0) + 1
        where = (f"{kind} errno {case['errno']} at call {case['nth']} of commit "
                 f"{case['commit']}")
        violations += [f"{where}: {p}" for p in _judge(case, out)]
    fault_summary.add("LMDB faults through libfiu", len(cases), MIN_CASES,
                      f"{len(violations)} violations")
    assert len(cases) >= MIN_CASES, f"only {len(cases)} cases: {kinds}"
    # every kind of fault was reached, and some commits did fail (the cases bite)
    assert {k.split()[1] for k in kinds} >= {"posix/io/rw/pwrite", "posix/io/rw/writev",
                                             "posix/io/sync/fdatasync", "posix/mm/mmap"}
    assert sum(1 for out in outcomes if out["failed"] is not None) >= MIN_CASES // 2
    assert not violations, "\n".join(violations[:30])
