"""The workflow layer's side of fencing, without a server: a leased run is written with
this host's own acquisition's token (kept in host-local state), never with the token its
record names; a write to a run whose lease this host does not hold is refused before
anything is written (LeaseLostError naming the holder and the way to take over).

A record "leased by another host" is put here as it would arrive by a pull or a restore:
a run record naming that host and its token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.workflow._internal import put_internal
from walsync.engine import Store
from walsync.engine.errors import ConflictError, LeaseLostError, WorkflowError
from walsync.engine.events import RunEvent
from walsync.engine.workflow import (
    RetentionPolicy,
    RunStatus,
    Workflows,
    drop_lease,
    held_lease,
    hold_lease,
    keys,
)
from walsync.sync.merge import record_to_wire

OTHER = "0ther-host-node"


@dataclass(frozen=True)
class FakeLease:
    """What sync.lease.Leases.acquire returns (the engine takes any such object)."""

    run_id: str
    holder: str
    token: int


def lease_elsewhere(store: Store, run_id: str, token: int, holder: str = OTHER) -> None:
    """The run's record as another host, holding its lease, last wrote it."""
    record = dict(store.get(keys.run(run_id)))
    record.update(owner_node=holder, lease_token=token)
    put_internal(store, keys.run(run_id), record)


def fences_since(store: Store, lsn: int) -> list[int]:
    """The fence of every key written after ``lsn`` (as it would be shipped)."""
    store.flush()
    out = []
    for rec in store.wal_reader().read(lsn, store.applied_lsn, 1 << 20, 1 << 30):
        out += [int(e["fence"]) for e in record_to_wire(rec.lsn, rec.ops)]
    return out


def test_a_run_leased_elsewhere_is_read_but_never_written(wf: Workflows, store: Store) -> None:
    run = wf.run("w", "r1")
    run.step("a", lambda: 1)
    lease_elsewhere(store, "r1", 3)
    loaded = wf.get_run("r1")
    assert loaded.fence == 0  # the record's token 3 is the other host's
    assert loaded.snapshot() == {"a": 1}  # reading is fine
    before = store.applied_lsn
    with pytest.raises(LeaseLostError) as info:
        loaded.step("b", lambda: 2)
    err = info.value
    assert (err.run_id, err.holder, err.current_token) == ("r1", OTHER, 3)
    assert "nothing was written" in str(err)
    assert "holds no lease" in str(err)
    assert "Leases(transport, store=store)" in err.hint
    with pytest.raises(LeaseLostError), wf.run("w", "r1") as again:
        again.step("b", lambda: 2)
    for write in (loaded.complete, loaded.pause, loaded.cancel,
                  lambda: loaded.set_metadata(x=1), lambda: loaded.checkpoint("cp")):
        with pytest.raises(LeaseLostError):
            write()
    assert store.applied_lsn == before


def test_a_token_not_acquired_here_is_refused(wf: Workflows, store: Store) -> None:
    wf.run("w", "r1")
    lease_elsewhere(store, "r1", 3)
    run = wf.get_run("r1")
    before = store.applied_lsn
    with pytest.raises(LeaseLostError, match="without having acquired it"):
        run.set_lease(store.node_id, 3)  # the record's token, copied
    with pytest.raises(LeaseLostError, match="was taken over by"):
        run.set_lease(store.node_id, 2)  # older than the record's
    with pytest.raises(WorkflowError, match="not by this store's node"):
        run.set_lease(OTHER, 4)
    with pytest.raises(WorkflowError, match="not on 'r1'"):
        run.set_lease(FakeLease("r2", store.node_id, 4))
    assert held_lease(store, "r1") is None
    assert store.applied_lsn == before
    # a newer acquisition of its own: the run is this host's from now on
    run.set_lease(FakeLease("r1", store.node_id, 4))
    assert held_lease(store, "r1") == 4
    assert run.fence == 4
    mark = store.applied_lsn
    run.step("a", lambda: 1)
    assert set(fences_since(store, mark)) == {4}
    record = store.get(keys.run("r1"))
    assert (record["owner_node"], record["lease_token"]) == (store.node_id, 4)


def test_a_lease_taken_through_the_store_is_stamped_on_the_run(wf: Workflows,
                                                                store: Store) -> None:
    run = wf.run("w", "r1")
    mark = store.applied_lsn
    run.step("a", lambda: 1)
    assert set(fences_since(store, mark)) == {0}  # unleased: unfenced writes
    hold_lease(store, "r1", 7)  # what Leases(transport, store=store).acquire does
    mark = store.applied_lsn
    run.step("b", lambda: 2)
    assert set(fences_since(store, mark)) == {7}
    record = store.get(keys.run("r1"))
    assert (record["owner_node"], record["lease_token"]) == (store.node_id, 7)
    # a run created under a lease object takes its run id from it
    created = wf.run("w", lease=FakeLease("r2", store.node_id, 1))
    assert (created.run_id, created.fence) == ("r2", 1)


def test_its_own_lease_is_this_hosts_whatever_token_the_server_gives_next(
        wf: Workflows, store: Store) -> None:
    """A record naming this host with a token above the one it now holds: the server's
    tokens were set back (a restore from a backup); the server judges the token."""
    wf.run("w", "r1", lease=(store.node_id, 5)).step("a", lambda: 1)
    run = wf.get_run("r1")
    run.set_lease(store.node_id, 2)
    mark = store.applied_lsn
    run.step("b", lambda: 2)
    assert set(fences_since(store, mark)) == {2}


def test_the_lease_stays_with_the_store_across_reopening(store_path: Path) -> None:
    with Store.open(store_path) as store:
        Workflows(store).run("w", "r1", lease=(store.node_id, 2)).step("a", lambda: 1)
    with Store.open(store_path) as store:
        run = Workflows(store).get_run("r1")
        assert run.fence == 2
        run.step("b", lambda: 2)


def test_a_dropped_lease_refuses_the_next_write_naming_who_took_it(wf: Workflows,
                                                                   store: Store) -> None:
    run = wf.run("w", "r1", lease=(store.node_id, 2))
    run.step("a", lambda: 1)
    assert drop_lease(store, "r1", upto_token=1) is False  # a newer lease of its own stays
    assert held_lease(store, "r1") == 2
    # the replicator was told: another host leases the run now, with token 5
    assert drop_lease(store, "r1", upto_token=5, lost_to=OTHER, current_token=5) is True
    assert held_lease(store, "r1") is None
    wf.run("w", "r2")
    run3 = wf.run("w", "r3", lease=(store.node_id, 1))
    before = store.applied_lsn
    with pytest.raises(LeaseLostError) as info:
        run.step("b", lambda: 2)
    assert (info.value.holder, info.value.current_token) == (OTHER, 5)
    # an unleased run the server says is leased: refused too, before any pull
    drop_lease(store, "r2", lost_to=OTHER, current_token=1)
    with pytest.raises(LeaseLostError, match=OTHER):
        wf.get_run("r2").step("a", lambda: 1)
    # released (no word on a new holder): the record names this host, which holds nothing
    drop_lease(store, "r3")
    with pytest.raises(LeaseLostError, match="no longer holds its lease"):
        run3.step("a", lambda: 1)
    assert store.applied_lsn == before
    # taking it again (a larger token) makes it writable
    run.set_lease(store.node_id, 6)
    run.step("b", lambda: 2)


def test_a_stale_run_object_reports_the_takeover_not_a_conflict(wf: Workflows,
                                                                store: Store) -> None:
    run = wf.run("w", "r1", lease=(store.node_id, 1))
    run.step("a", lambda: 1)
    # Another Run object of this host writes: a plain conflict for the first one.
    other = wf.get_run("r1")
    other.step("b", lambda: 2)
    with pytest.raises(ConflictError):
        run.step("c", lambda: 3)
    # A pulled record of the host that took the run over: a lease loss.
    run = wf.get_run("r1")
    lease_elsewhere(store, "r1", 2)
    before = store.applied_lsn
    with pytest.raises(LeaseLostError) as info:
        run.step("c", lambda: 3)
    assert (info.value.holder, info.value.current_token) == (OTHER, 2)
    assert isinstance(info.value.__cause__, ConflictError)
    assert store.applied_lsn == before


def test_leaving_a_run_on_a_lease_loss_records_nothing(wf: Workflows, store: Store) -> None:
    run = wf.run("w", "r1", lease=(store.node_id, 1))
    events = store.events.subscribe(kinds="run")

    def drive() -> None:
        with run:
            run.step("a", lambda: 1)
            drop_lease(store, "r1", lost_to=OTHER, current_token=2)
            run.step("b", lambda: 2)

    try:
        with pytest.raises(LeaseLostError):
            drive()
        assert store.get(keys.run("r1"))["status"] == RunStatus.RUNNING
        got = []
        while (event := events.get(timeout_seconds=0.2)) is not None:
            got.append(event)
        assert [e.new_status for e in got if isinstance(e, RunEvent)] == ["running"]
    finally:
        events.close()


def test_retention_leaves_runs_leased_elsewhere_to_their_holder(wf: Workflows,
                                                                store: Store) -> None:
    for run_id in ("mine", "theirs", "free"):
        lease = (store.node_id, 1) if run_id == "mine" else None
        run = wf.run("w", run_id, lease=lease)
        run.start()
        run.complete()
    lease_elsewhere(store, "theirs", 2)
    mark = store.applied_lsn
    report = wf.apply_retention(RetentionPolicy(max_age_seconds=0))
    assert sorted(report.runs_removed) == ["free", "mine"]
    assert report.runs_leased_elsewhere == ["theirs"]
    assert store.get(keys.run("theirs")) is not None
    assert sorted(fences_since(store, mark)) == [0, 0, 1, 1]


def test_a_run_leased_elsewhere_is_migrated_in_memory_only(store: Store) -> None:
    Workflows(store).run("w", "r1")
    lease_elsewhere(store, "r1", 2)
    before = store.applied_lsn

    def upgrade(state: dict[str, Any]) -> dict[str, Any]:
        state["run"]["metadata"]["upgraded"] = True
        return state

    run = Workflows(store, migrations=[upgrade]).get_run("r1")
    assert run.record.metadata["upgraded"] is True
    assert run.record.schema_version == 2
    assert store.applied_lsn == before  # the holder writes it back, not this host


def test_hold_lease_takes_positive_tokens_only(store: Store) -> None:
    for bad in (0, -1, True, 1 << 63, "3"):
        with pytest.raises(ValueError, match="positive 63-bit"):
            hold_lease(store, "r1", bad)  # type: ignore[arg-type]
    assert held_lease(store, "r1") is None
