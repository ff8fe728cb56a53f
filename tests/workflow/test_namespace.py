"""The reserved namespace (engine/keyspace.py): user keys cannot enter it, a user key in
the old run spelling is no run, and a malformed record inside it is a CorruptionError
naming the key, never a TypeError (engine/FORMAT.md, "Keys"; invariant 8)."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path
from typing import Any

import cbor2
import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.ui.conftest import request
from tests.workflow._internal import put_internal
from walsync.engine import (
    CorruptionError,
    Delete,
    InvalidKeyError,
    Put,
    RunEvent,
    StepEvent,
    Store,
    Version,
)
from walsync.engine.errors import RunNotFoundError, WalsyncError
from walsync.engine.keyspace import RESERVED_PREFIX
from walsync.engine.record import CODEC_NONE
from walsync.engine.versions import Sibling
from walsync.engine.workflow import StepRecord, Workflows, keys
from walsync.sync.cli import main
from walsync.sync.ui import serve

#: keys inside the namespace: its own keys, and anything else that starts with it
RESERVED = st.one_of(
    st.sampled_from([keys.run("r"), keys.index("r"), keys.step("r", "s"), RESERVED_PREFIX,
                     RESERVED_PREFIX + "lg/layout", RESERVED_PREFIX + "x"]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
            max_size=20).map(lambda t: RESERVED_PREFIX + t),
)


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# -- the Store API boundary -------------------------------------------------------------


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=RESERVED)
def test_every_user_write_into_the_namespace_is_refused_naming_the_key(
        store: Store, key: str) -> None:
    before = store.next_lsn
    writes = [
        lambda: store.put(key, 1),
        lambda: store.delete(key),
        lambda: store.commit([Put("user/ok", 1), Put(key, 2)]),
        lambda: store.commit([Delete(key)], durability="none"),
    ]
    for write in writes:
        with pytest.raises(InvalidKeyError) as info:
            write()
        assert repr(key)[:40] in str(info.value)
        assert RESERVED_PREFIX in str(info.value)
        assert info.value.hint
    with pytest.raises(InvalidKeyError):
        _batch_of(store, [("user/ok", 1), (key, 1)])
    assert store.next_lsn == before  # nothing was written, not even the batch's user key
    assert store.get("user/ok") is None
    store.commit([Put(key, "walsync's")], internal=True)
    assert store.get(key) == "walsync's"


def _batch_of(store: Store, items: list[tuple[str, Any]]) -> None:
    with store.batch() as b:
        for key, value in items:
            b.put(key, value)


def test_keys_beside_the_namespace_are_the_users(store: Store) -> None:
    for key in ("runs/1", "index/runs/1", "lg/layout", ".walsync", ".walsyncx/a", "walsync/a",
                ".Walsync/runs/1", "x/.walsync/runs/1"):
        store.put(key, {"step": 2})
        assert store.get(key) == {"step": 2}


# -- a user key in the old spelling is no run ---------------------------------------------


def test_a_user_key_runs_1_is_not_run_1(store: Store) -> None:
    store.put("runs/1", {"step": 2})
    store.put("index/runs/1", {"step": 2})
    wf = Workflows(store)
    with pytest.raises(RunNotFoundError):
        wf.get_run("1")
    assert wf.list_runs() == []
    run = wf.run("w", run_id="1")
    with run:
        run.step("a", lambda: "A")
    assert Workflows(store).get_run("1").snapshot() == {"a": "A"}
    assert store.get("runs/1") == {"step": 2}  # the user's key is the user's
    assert store.get(keys.run("1"))["workflow"] == "w"


def test_walsync_put_runs_1_then_runs_show_1(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    assert cli("init", path).exit_code == 0
    assert cli("put", "-s", path, "runs/1", '{"step": 2}').exit_code == 0
    shown = cli("runs", "show", "-s", path, "1")
    assert shown.exit_code != 0, shown.output  # no such run (before: a TypeError)
    assert "Traceback" not in shown.output
    assert "no run '1'" in shown.stderr
    refused = cli("put", "-s", path, keys.run("1"), '{"step": 2}')
    assert refused.exit_code == 2  # input the store refuses
    assert RESERVED_PREFIX in refused.stderr
    with Store.open(path) as store:
        Workflows(store).run("w", run_id="1").complete()
    shown = cli("runs", "show", "-s", path, "1", "--json")
    assert shown.exit_code == 0, shown.output
    assert '"workflow": "w"' in shown.stdout


# -- malformed records inside the namespace ------------------------------------------------

#: values a record field could hold after a foreign write
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6,
)


def _made(store: Store, run_id: str) -> None:
    wf = Workflows(store)
    run = wf.run("w", run_id=run_id)
    with run:
        run.step("a", lambda: "A")
        run.checkpoint("cp")
        run.step("b", lambda: "B")


@settings(max_examples=80, deadline=None)
@given(which=st.sampled_from(["run", "step", "index", "checkpoint"]),
       field=st.sampled_from(["run_id", "workflow", "status", "steps_done", "metadata", "cost",
                              "created_at", "error", "attempts", "seq", "step_id",
                              "idempotent", "output_key", "fraction", "lease_token", "run",
                              "steps", "tags", "name", None]),
       value=ANY_VALUE)
def test_a_malformed_record_is_a_corruption_error_naming_its_key(
        which: str, field: str | None, value: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp, \
            Store.open(Path(tmp) / "s", durability="none") as store:
        _made(store, "r")
        key = {"run": keys.run("r"), "step": keys.step("r", "a"), "index": keys.index("r"),
               "checkpoint": keys.checkpoint("r", "cp")}[which]
        stored = store.get(key)
        put_internal(store, key, value if field is None else {**stored, field: value})
        wf = Workflows(store)
        for read in (lambda: wf.get_run("r"), lambda: wf.list_runs(),
                     lambda: wf.get_run("r").checkpoints(),
                     lambda: wf.get_run("r").rollback("cp")):
            # only walsync's own errors (a None value reads as no record, a record
            # naming a lease refuses the write); a TypeError or KeyError propagates
            refusal = _refusal_of(read)
            if isinstance(refusal, CorruptionError):
                assert repr(key) in str(refusal)
                assert refusal.hint


def _refusal_of(read: Any) -> WalsyncError | None:
    try:
        read()
    except WalsyncError as exc:
        return exc
    return None


def test_malformed_records_are_refused_by_name(store: Store, tmp_path: Path) -> None:
    _made(store, "r")
    put_internal(store, keys.run("r"), {**store.get(keys.run("r")), "steps_done": "two"})
    with pytest.raises(CorruptionError, match=r"'\.walsync/runs/r'.*steps_done"):
        Workflows(store).get_run("r")
    put_internal(store, keys.run("r"), ["not", "a", "record"])
    with pytest.raises(CorruptionError, match="not a map"):
        Workflows(store).get_run("r")
    put_internal(store, keys.run("r"), {**store.get(keys.index("r")), "run_id": "other",
                                        "workflow": "w"})
    with pytest.raises(CorruptionError, match="record of run 'other'"):
        Workflows(store).get_run("r")
    put_internal(store, keys.index("r"), 7)
    with pytest.raises(CorruptionError, match=r"'\.walsync/index/runs/r'"):
        Workflows(store).list_runs()
    bad_step = StepRecord("zz").to_dict()
    put_internal(store, keys.step("r", "b"), bad_step)
    store.close()
    shown = cli("runs", "show", "-s", str(store.path), "r")
    assert shown.exit_code == 3, shown.output  # damage
    assert "Traceback" not in shown.output
    assert ".walsync/runs/r" in shown.stderr


def test_a_field_of_the_wrong_type_in_a_step_is_refused(store: Store) -> None:
    _made(store, "r")
    put_internal(store, keys.step("r", "a"), {**store.get(keys.step("r", "a")),
                                              "attempts": "1", "created_at": "yesterday"})
    with pytest.raises(CorruptionError, match=r"'\.walsync/runs/r/steps/a'.*attempts"):
        Workflows(store).get_run("r")
    put_internal(store, keys.step("r", "a"), {**store.get(keys.step("r", "a")),
                                              "attempts": 1, "created_at": dt.datetime.now(dt.UTC),
                                              "cost": {"usd": "free"}})
    with pytest.raises(CorruptionError, match="cost"):
        Workflows(store).get_run("r")


# -- events name the keys they concern -------------------------------------------------------


def test_run_and_step_events_concern_their_keys_in_the_namespace(store: Store) -> None:
    wf = Workflows(store)
    with store.events.subscribe(kinds=("run", "step"), prefix=keys.run("r1")) as mine, \
            store.events.subscribe(kinds=("run", "step"), prefix="runs/") as users:
        with wf.run("w", run_id="r1") as run:
            run.step("a", lambda: 1)
        with wf.run("w", run_id="r2") as run:
            run.step("a", lambda: 1)
        store.close()
        got = list(mine)
        assert list(users) == []
    assert {e.run_id for e in got} == {"r1"}
    assert [(type(e).__name__, e.key) for e in got if isinstance(e, StepEvent)] == [
        ("StepEvent", keys.step("r1", "a"))] * 2
    assert all(e.key == keys.run("r1") for e in got if isinstance(e, RunEvent))


def test_the_dashboard_keeps_one_version_of_a_run_record_two_hosts_wrote(
        tmp_path: Path) -> None:
    """A conflict on a key in the namespace is resolved by keeping one of its versions
    (the dashboard's action); the user's own write there stays refused."""
    path = tmp_path / "s"
    with Store.open(path) as store:
        _made(store, "r")
        theirs = {**store.get(keys.run("r")), "metadata": {"by": "other"}}
        store.apply_remote([(keys.run("r"), Sibling(
            Version("other", 9, store.get_version(keys.run("r")).hlc + 1, {"other": 9}),
            CODEC_NONE, cbor2.dumps(theirs)))])
        dots = [f"{v.version.origin}:{v.version.lsn}" for v in store.get_versions(keys.run("r"))]
        assert len(dots) == 2
    server = serve(path, port=0, allow_actions=True, environ={}).start()
    try:
        status, doc = request(server, "POST", "/api/conflicts/resolve",
                              {"key": keys.run("r"), "keep": "other:9", "seen": dots})
    finally:
        server.close()
    assert status == 200, doc
    with Store.open(path) as store:
        assert [v.value for v in store.get_versions(keys.run("r"))] == [theirs]
        assert Workflows(store).get_run("r").record.metadata == {"by": "other"}
