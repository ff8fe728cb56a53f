"""Replay reads the common record (one put) by slicing its key and entry out of
the frame, and any other record through the full decoder: every shape of key,
value and record must come back from the WAL exactly as written."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from walsync.engine import Delete, Put, Store

keys = st.one_of(
    st.text(min_size=1, max_size=30).filter(lambda k: "\x00" not in k),
    # lengths around the CBOR head boundaries (23/24, 255/256 bytes)
    st.sampled_from([22, 23, 24, 25, 254, 255, 256, 300]).map(lambda n: "k" * n),
    st.sampled_from(["é" * 12, "键" * 9, "🙂" * 7]),
).filter(lambda k: not k.startswith(".walsync/"))
values = st.one_of(
    st.none(), st.integers(), st.text(max_size=40),
    # entry sizes around the CBOR head boundaries, and above the compression threshold
    st.sampled_from([0, 5, 100, 200, 250, 300, 65_400, 65_600, 70_000]).map(lambda n: b"v" * n),
    st.binary(max_size=300),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=4),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), keys, values),
        st.tuples(st.just("delete"), keys, st.none()),
        st.tuples(st.just("batch"), keys, values),
    ),
    min_size=1, max_size=25,
)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops)
def test_replay_after_a_power_loss_gives_every_record_back(
    tmp_path_factory: Any, script: list[tuple[str, str, Any]]
) -> None:
    path: Path = tmp_path_factory.mktemp("replay") / "s"
    Store.open(path).close()
    saved = path.parent / "snapshot-at-checkpoint"
    shutil.copytree(path / "snapshot", saved)
    model: dict[str, Any] = {}
    with Store.open(path, durability="none") as store:
        for what, key, value in script:
            if what == "put":
                store.put(key, value)
                model[key] = value
            elif what == "delete":
                store.delete(key)
                model.pop(key, None)
            else:
                store.commit([Put(key, value), Put(key + "/2", 1), Delete(key + "/3")])
                model[key] = value
                model[key + "/2"] = 1
                model.pop(key + "/3", None)
        last = store.next_lsn - 1
        versions = {key: store.get_version(key) for key in model}
    # a power loss: the snapshot is back at its checkpoint, the WAL holds every record
    shutil.rmtree(path / "snapshot")
    shutil.copytree(saved, path / "snapshot")
    with Store.open(path) as store:
        assert store.recovery is not None
        assert store.recovery.replayed_records == last
        assert dict(store.scan()) == model
        assert {key: store.get(key) for key in model} == model
        assert {key: store.get_version(key) for key in model} == versions
