"""The crash harness itself: the fork server, kill points, and the ledger on a server-like side."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.crash.children import Zygote
from tests.crash.killpoints import KillPlan
from tests.crash.ledger import Commit, KeyState, Ledger, Observed
from tests.crash.rounds import store_round
from tests.crash.store_lane import Kill, StoreLane, Tally
from tests.crash.store_load import StoreChildConfig

pytestmark = pytest.mark.crash

PROBE = "tests.crash.zygote:probe"


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    with Zygote(tmp_path_factory.mktemp("zygote")) as z:
        yield z


def _fds(lines: list[str]) -> dict[int, str]:
    return {int(fd): target for _, fd, target in
            (line.split(" ", 2) for line in lines if line.startswith("F "))}


def test_zygote_children_inherit_no_store_and_no_thread(zygote: Zygote, tmp_path: Path) -> None:
    """After children have opened, committed to and been killed on a store, a new child
    starts single-threaded with only its standard descriptors and its report pipe: no
    LMDB environment, WAL segment or lock of a store, no socket of the server. The
    zygote holds none of the store's files either."""
    lane = StoreLane(zygote, tmp_path / "lane", "probe", random.Random(1), Tally())
    for _ in range(3):
        lane.run_child(Kill("acks", acks=10))
    child = zygote.spawn(PROBE, {}, tmp_path / "probe.log")
    assert child.finish(30) == 0
    assert child.lines[0] == "T 1"
    fds = _fds(child.lines)
    assert fds[0] == os.devnull
    assert fds[1] == fds[2] == str(tmp_path / "probe.log")
    others = {fd: target for fd, target in fds.items() if fd > 2}
    # the report pipe, and the descriptor listing /proc/self/fd while it is read
    assert len(others) <= 2, others
    assert all(t.startswith(("pipe:", "/proc/")) for t in others.values()), others
    store = str(lane.path)
    held = [os.readlink(f"/proc/{zygote.pid}/fd/{fd}")
            for fd in os.listdir(f"/proc/{zygote.pid}/fd")]
    assert not [t for t in held if t.startswith(store)], held


def test_zygote_reports_exit_codes_and_kills_through_pidfd(
    zygote: Zygote, tmp_path: Path
) -> None:
    assert zygote.spawn(PROBE, {"code": 3}, tmp_path / "a.log").finish(30) == 3
    failed = zygote.spawn(PROBE, {"raise": True}, tmp_path / "b.log")
    assert failed.finish(30) == 70
    assert "the probe was asked to fail" in failed.log_text()
    # a child that would commit for a minute, killed by the parent
    config = StoreChildConfig(path=str(tmp_path / "store"), seed=2, generation=1,
                              max_seconds=60)
    child = zygote.spawn("tests.crash.store_load:child_main", config.to_dict(),
                         tmp_path / "c.log")
    assert child.wait_until(lambda: any(line.startswith("A ") for line in child.lines), 30)
    child.kill()
    assert child.finish(30) == -signal.SIGKILL
    assert zygote.spawned >= 3


def test_kill_point_reports_where_the_child_died(zygote: Zygote, tmp_path: Path) -> None:
    """A plan names the call, its side and its hit; the child says where it died."""
    tally = Tally()
    lane = StoreLane(zygote, tmp_path, "points", random.Random(3), tally)
    plan = KillPlan("fs.fdatasync@WALWriter.append", "after", nth=5, after_acks=3)
    inc = lane.run_child(Kill("point", plan=plan))
    assert inc.killed_at == ("fs.fdatasync@WALWriter.append", "after")
    assert len(inc.acks) >= 3
    bare = KillPlan("lmdb.apply_puts", "before", nth=2)  # any caller
    assert lane.run_child(Kill("point", plan=bare)).killed_at is not None
    assert tally.kills == 2


def test_ledger_checks_a_server_like_side() -> None:
    """How a sync checker uses the ledger: rows read from a server, no next LSN."""
    rows: dict[str, KeyState] = {"a": KeyState(1, "a1", False), "b": KeyState(2, "b2", False)}

    def observed() -> Observed:
        return Observed(rows.get, set(rows))

    ledger = Ledger()
    shipped = [Commit("n1", 0, {"a": "a1"}, lsn=1), Commit("n1", 1, {"b": "b2"}, lsn=2)]
    assert ledger.check(shipped, observed()) == []
    # an acknowledged commit the server lost, and an in-flight batch half there
    rows["c"] = KeyState(4, "c4", False)
    problems = Ledger(dict(ledger.known), ledger.max_lsn).check(
        [Commit("n1", 2, {"a": "a3"}, lsn=3), Commit("n1", 3, {"c": "c4", "d": "d4"})],
        observed())
    assert problems == [
        "key 'a': expected the acknowledged write at LSN 3 (LSN 3 value 'a3'), found LSN 1 "
        "value 'a1'",
        "half-applied commit 3 of writer n1: present on ['c'], absent on ['d']",
    ]
    # a duplicate delivery that made a row no commit wrote
    rows["e"] = KeyState(9, "e9", False)
    assert ledger.check([], observed()) == ["keys no commit wrote: ['c', 'e']"]


def test_soak_engine_round_counts_its_kills(zygote: Zygote, tmp_path: Path) -> None:
    result = store_round(zygote, random.Random(4), tmp_path)
    assert result.violations == []
    assert result.kills >= 30
    assert result.acknowledged > 0
