"""Store.snapshot(): several reads from one consistent view."""

from __future__ import annotations

from pathlib import Path

import cbor2

from walsync.engine import Store
from walsync.engine.record import CODEC_NONE, compress_value
from walsync.engine.store import Put
from walsync.engine.versions import Sibling, Version


def test_snapshot_view_does_not_see_later_commits(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        store.put("a", 1)
        store.put("runs/1", {"n": 1})
        with store.snapshot() as view:
            store.commit([Put("a", 2), Put("runs/2", {"n": 2})])
            store.delete("runs/1")
            assert view.get("a") == 1
            assert view.scan("runs/") == [("runs/1", {"n": 1})]
            version = view.get_version("a")
            assert version is not None
            assert version.lsn == 1
            assert [v.value for v in view.get_versions("runs/1")] == [{"n": 1}]
        assert store.get("a") == 2
        assert [k for k, _ in store.scan("runs/")] == ["runs/2"]


def test_snapshot_view_missing_and_deleted_keys(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        store.put("gone", 1)
        store.delete("gone")
        with store.snapshot() as view:
            assert view.get("gone", "default") == "default"
            assert view.get_version("gone") is None
            assert view.get("never") is None
            assert view.get_versions("never") == []


def test_get_versions_collapses_identical_values_stored_with_different_codecs(
    tmp_path: Path,
) -> None:
    value = {"text": "same " * 2000}
    raw = cbor2.dumps(value)
    codec, packed = compress_value(raw, 3)
    assert codec != CODEC_NONE
    with Store.open(tmp_path / "s") as store:
        store.apply_remote([
            ("k", Sibling(Version("A", 1, 100, {"A": 1}), CODEC_NONE, raw)),
            ("k", Sibling(Version("B", 1, 101, {"B": 1}), codec, packed)),
        ])
        versions = store.get_versions("k")
        assert len(versions) == 1
        assert versions[0].value == value
        assert dict(versions[0].version.vv) == {"A": 1, "B": 1}
