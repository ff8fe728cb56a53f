"""The shared merge vectors, run against the Python rules, the SQL functions and the
in-memory reference server (sync/memory.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cbor2
import pytest

from walsync.engine.record import CODEC_NONE
from walsync.engine.versions import Sibling, Version
from walsync.sync.memory import MemoryServer
from walsync.sync.merge import Replica, sibling_to_wire
from walsync.sync.migrate import migrate
from walsync.sync.postgres import PostgresTransport

VECTORS = json.loads((Path(__file__).with_name("merge_vectors.json")).read_text())["cases"]
IDS = [c["name"] for c in VECTORS]


def _sibling(d: dict[str, Any]) -> Sibling:
    data = None if d["value"] is None else cbor2.dumps(d["value"])
    version = Version(d["origin"], d["lsn"], d["hlc"], d["vv"], d.get("fence", 0), data is None)
    return Sibling(version, CODEC_NONE, data)


@pytest.mark.parametrize("case", VECTORS, ids=IDS)
def test_merge_vectors_python(case: dict[str, Any]) -> None:
    replica = Replica()
    for d in case["deliveries"]:
        replica.apply(d["key"], _sibling(d))
    for key, want in case["expected"].items():
        stored = sorted([s.version.origin, s.version.lsn] for s in replica.keys[key])
        assert stored == sorted(want["stored"]), case["name"]
        best = replica.winner(key)
        assert best is not None
        assert [best.version.origin, best.version.lsn] == want["winner"]
        assert len(replica.visible(key)) == want["visible"]
        assert best.deleted == want.get("deleted", False)


@pytest.mark.parametrize("case", VECTORS, ids=IDS)
def test_merge_vectors_memory(case: dict[str, Any]) -> None:
    """As the SQL test below: each delivery one push, then the server's siblings, the
    winner its ``walsync.state`` view names and what ``conflicts`` counts."""
    server = MemoryServer()
    transport = server.transport()
    for d in case["deliveries"]:
        transport.push(d["origin"], 0, [sibling_to_wire(d["key"], 0, _sibling(d))])
    stored = server.siblings()
    state = server.state()
    conflicts = {c.key: c.versions for c in transport.conflicts("", 1000)}
    for key, want in case["expected"].items():
        assert sorted([s["origin"], s["lsn"]] for s in stored[key]) == sorted(want["stored"]), \
            case["name"]
        assert [state[key]["origin"], state[key]["lsn"]] == want["winner"]
        assert state[key]["deleted"] == want.get("deleted", False)
        assert conflicts.get(key, 1) == want["visible"]


@pytest.mark.postgres
@pytest.mark.parametrize("case", VECTORS, ids=IDS)
def test_merge_vectors_sql(case: dict[str, Any], pg_db: str) -> None:
    migrate(pg_db)
    transport = PostgresTransport(pg_db)
    try:
        for d in case["deliveries"]:
            entry = sibling_to_wire(d["key"], 0, _sibling(d))
            transport.push(d["origin"], 0, [entry])
        import psycopg

        with psycopg.connect(pg_db) as conn:
            for key, want in case["expected"].items():
                stored = conn.execute(
                    "select origin, lsn from walsync.siblings where key = %s", (key,)
                ).fetchall()
                assert sorted([o, n] for o, n in stored) == sorted(want["stored"]), case["name"]
                winner = conn.execute(
                    "select origin, lsn, deleted from walsync.state where key = %s", (key,)
                ).fetchone()
                assert winner is not None
                assert [winner[0], winner[1]] == want["winner"]
                assert winner[2] == want.get("deleted", False)
                row = conn.execute(
                    "select versions from walsync.conflicts where key = %s", (key,)
                ).fetchone()
                assert (row[0] if row else 1) == want["visible"]
    finally:
        transport.close()
