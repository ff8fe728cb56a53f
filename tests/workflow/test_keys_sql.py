"""The run-key grammar (engine/workflow/keys.py) and its SQL twin agree.

The sync server fences a key by the run ``walsync.run_of`` finds in it, and
``lease_acquire`` starts a new holder's token above the tokens of the run's
record and index keys it spells itself. Both are checked here against keys.py
in a real PostgreSQL, over many generated keys: the grammar's own keys, the
legacy spelling, near misses (a prefix short of a slash, another case, a
segment added), and arbitrary text (with ``%``, ``_``, slashes, non-ASCII).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.pg import PostgresCluster
from tests.sync._helpers import entry
from walsync.engine.keyspace import RESERVED_PREFIX
from walsync.engine.workflow import keys
from walsync.sync.migrate import migrate

pytestmark = pytest.mark.postgres

#: keys are UTF-8 text without NUL (the store refuses others)
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=12)
SEGMENT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/"),
                  min_size=1, max_size=8)
#: prefixes of run keys in both spellings, and their near misses
PREFIXES = [
    keys.RUNS, keys.INDEX, keys.LEGACY.RUNS, keys.LEGACY.INDEX, RESERVED_PREFIX,
    RESERVED_PREFIX + "run/", RESERVED_PREFIX + "runs", RESERVED_PREFIX + "index/runs",
    RESERVED_PREFIX + "index/run/", RESERVED_PREFIX + "lg/", ".Walsync/runs/", "walsync/runs/",
    ".walsync//runs/", "runs", "runsx/", "index/runs", "index/run/", "x/runs/", "x/index/runs/",
    "%/runs/", "_walsync/runs/", "",
]


@st.composite
def run_keys(draw: st.DrawFn) -> str:
    """A key the grammar writes (either spelling), or a near miss of one."""
    grammar = draw(st.sampled_from([keys.CURRENT, keys.LEGACY]))
    run_id, other = draw(SEGMENT), draw(SEGMENT)
    key = draw(st.sampled_from([
        grammar.run(run_id), grammar.index(run_id), grammar.step(run_id, other),
        grammar.output(run_id, other, draw(st.integers(0, 10**6)), draw(st.integers(0, 99))),
        grammar.checkpoint(run_id, other), grammar.discarded(run_id, 3) + other,
        grammar.all_of_run(run_id), grammar.RUNS, grammar.INDEX,
    ]))
    return key + draw(st.sampled_from(["", "", "/", "/x", "x", "//"]))


KEYS = st.one_of(run_keys(), st.builds(lambda p, t: p + t, st.sampled_from(PREFIXES), TEXT),
                 TEXT)


@pytest.fixture(scope="module")
def server(pg_cluster: PostgresCluster) -> Iterator[str]:
    """One migrated database for the module (hypothesis runs many examples on it)."""
    name = "walsync_keys_sql"
    dsn = pg_cluster.create_database(name)
    try:
        migrate(dsn)
        yield dsn
    finally:
        pg_cluster.drop_database(name)


def sql(dsn: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def test_the_grammar_parses_what_it_spells() -> None:
    for grammar in (keys.CURRENT, keys.LEGACY):
        for run_id in ("r", "2026-11-23", "é", "%_"):
            for key in (grammar.run(run_id), grammar.index(run_id),
                        grammar.step(run_id, "s"), grammar.output(run_id, "s", 1, 2),
                        grammar.checkpoint(run_id, "c"), grammar.discarded(run_id, 1) + "s"):
                assert grammar.run_id_of(key) == run_id
                assert keys.run_of(key) == run_id
        assert grammar.step_id_of("r", grammar.step("r", "s#2")) == "s#2"
    assert keys.translate(keys.LEGACY.step("r", "s")) == keys.step("r", "s")
    assert keys.record_keys("r") == (keys.run("r"), keys.index("r"), "runs/r", "index/runs/r")
    assert keys.run_of("orders/1") is None
    assert keys.run_of(RESERVED_PREFIX + "lg/c/t") is None
    with pytest.raises(ValueError, match="legacy spelling"):
        keys.translate(keys.run("r"))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(KEYS, min_size=1, max_size=40))
def test_run_of_is_the_sql_run_of(server: str, batch: list[str]) -> None:
    got = dict(sql(server, "select k, walsync.run_of(k) from unnest(%s::text[]) k", (batch,)))
    assert {k: keys.run_of(k) for k in batch} == got


_runs = itertools.count(1)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run_id=SEGMENT, fences=st.lists(st.integers(1, 1 << 40), min_size=4, max_size=4),
       decoy=st.integers(1, 1 << 41), which=st.sets(st.integers(0, 3), min_size=1))
def test_lease_floor_reads_the_record_keys_keys_py_names(
        server: str, run_id: str, fences: list[int], decoy: int, which: set[int]) -> None:
    """A new holder's token is above every token the run's record and index keys carry
    in either spelling (``keys.record_keys``), and no other key's."""
    n = next(_runs)
    run_id = f"{run_id}-{n}"  # a run no earlier example leased
    node = f"floor{n}"
    record_keys = keys.record_keys(run_id)
    written = {record_keys[i]: fences[i] for i in sorted(which)}
    decoys = [keys.step(run_id, "s"), keys.run(run_id + "x"), keys.index(run_id + "x"),
              keys.LEGACY.step(run_id, "s"), "x" + keys.LEGACY.run(run_id),
              keys.all_of_run(run_id)]
    batch = []
    for lsn, (key, fence) in enumerate([*written.items(), *((k, decoy) for k in decoys)],
                                       start=1):
        batch.append({**entry(node, lsn, key, {"n": lsn}), "fence": fence})
    pushed = sql(server, "select walsync_api.push(%s, %s, %s::jsonb)",
                 (node, len(batch), json.dumps(batch)))[0][0]
    assert pushed["fenced"] == []
    got = sql(server, "select walsync_api.lease_acquire(%s, %s, 60)", (run_id, node))[0][0]
    assert got["acquired"] is True
    assert got["token"] == max(written.values()) + 1


def test_a_lease_fences_the_runs_keys_in_both_spellings_and_no_user_key(server: str) -> None:
    """A host of an older walsync writes the legacy spelling, an upgraded one the
    namespace's: while either may push, the run's lease fences both."""
    run_id = f"both-{next(_runs)}"
    holder = sql(server, "select walsync_api.lease_acquire(%s, 'holder', 60)", (run_id,))[0][0]
    assert holder["acquired"] is True
    fenced_keys = [keys.run(run_id), keys.step(run_id, "s"), keys.index(run_id),
                   keys.LEGACY.run(run_id), keys.LEGACY.step(run_id, "s"),
                   keys.LEGACY.index(run_id)]
    free_keys = [f"orders/{run_id}", keys.run(run_id + "x"), f"{RESERVED_PREFIX}lg/{run_id}"]
    batch = [entry("other", lsn, key, lsn) for lsn, key in
             enumerate([*fenced_keys, *free_keys], start=1)]
    pushed = sql(server, "select walsync_api.push('other', %s, %s::jsonb)",
                 (len(batch), json.dumps(batch)))[0][0]
    assert [(f["run_id"], f["holder"]) for f in pushed["fenced"]] == [(run_id, "holder")]
    refused = sql(server, "select key from walsync.fenced where origin = 'other' order by key")
    assert sorted(k for (k,) in refused) == sorted(fenced_keys)
    stored = sql(server, "select key from walsync.entries where origin = 'other'")
    assert sorted(k for (k,) in stored) == sorted(free_keys)
