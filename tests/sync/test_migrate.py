"""Server schema migrations: one definition per function, and every path to the same schema.

Every function and view is defined once in the files ``walsync migrate`` applies: a
definition in an earlier file is superseded by a later one of the same signature (or
dropped), and the tenant files define none (they add policies, grants, the functions'
owner and the claim's setting). The databases a user may hold — fresh, at each earlier
level, in tenant mode from before the consolidation (built from the tenant files as they
were released, kept in ``released_migrations/``), turned to tenant mode late — all reach
the same schema, checked on the catalog (and byte for byte with ``pg_dump`` where the
columns were added in the same order), and the functions answer as they did before the
upgrade, call for call.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.pg import PostgresCluster, find_bindir
from tests.sync._helpers import dbname, entry, query, records
from walsync.sync.migrate import (
    RETIRED_TENANT_VERSIONS,
    _apply,
    list_migrations,
    migrate,
)

pytestmark = pytest.mark.postgres

DEFAULT = list_migrations()
TENANT = list_migrations(tenant=True)
RELEASED_TENANT_DIR = Path(__file__).with_name("released_migrations") / "tenant"
#: the tenant files as released before the consolidation (the migrator no longer has them)
RELEASED_TENANT = sorted((p.name[:14], p) for p in RELEASED_TENANT_DIR.glob("*.sql"))
CONSOLIDATED = "20261207000007"
#: the file that made pushes of different nodes run in parallel (push's definition)
PUSH_IN_PARALLEL = "20261207000008"
#: the file that added the nodes listing and the point-in-time reads of the log
NODES_AND_POINTS = "20261207000009"
#: the file of scoped pull and the entry log's retention (pull and log_window re-created)
SCOPE_AND_RETENTION = "20261207000010"

# -- the files: one live definition per function -------------------------------------------

_STATEMENT = re.compile(
    r"(?P<create>create\s+(?:or\s+replace\s+)?(?P<kind>function|view)\s+"
    r"(?P<name>walsync(?:_api)?\.[a-z_][a-z0-9_]*)\s*(?:\((?P<args>[^)]*)\))?)"
    r"|(?P<drop>drop\s+(?P<dkind>function|view)\s+(?:if\s+exists\s+)?"
    r"(?P<dname>walsync(?:_api)?\.[a-z_][a-z0-9_]*)\s*(?:\((?P<dargs>[^)]*)\))?)",
    re.IGNORECASE)
_BODY = re.compile(r"\bas\s+\$\$(.*?)\$\$", re.IGNORECASE | re.DOTALL)
_ANY_DEFINITION = re.compile(r"create\s+(?:or\s+replace\s+)?(?:function|procedure|view)\b",
                             re.IGNORECASE)


def _types(args: str | None, named: bool) -> str:
    """A signature's argument types, as PostgreSQL spells them in regprocedure."""
    out = []
    for arg in (a.strip() for a in (args or "").split(",")):
        if arg:
            words = arg.split()
            out.append(" ".join(words[1:] if named else words).lower())
    return ",".join(out)


@dataclass(frozen=True)
class Definition:
    file: str
    kind: str
    signature: str
    body: str | None  # a function's source, exactly as PostgreSQL stores it (prosrc)


def definitions(files: list[Path]) -> list[Definition | tuple[str, str]]:
    """Each file's function and view definitions (and drops, as ("drop", signature)), in
    the order migrate applies them."""
    out: list[Definition | tuple[str, str]] = []
    for path in files:
        text = path.read_text()
        for m in _STATEMENT.finditer(text):
            if m.group("create"):
                kind = m.group("kind").lower()
                signature = m.group("name").lower()
                body = None
                if kind == "function":
                    signature += f"({_types(m.group('args'), named=True)})"
                    found = _BODY.search(text, m.end())
                    assert found is not None, (path.name, signature)
                    body = found.group(1)
                out.append(Definition(path.name, kind, signature, body))
            else:
                signature = m.group("dname").lower()
                if m.group("dkind").lower() == "function":
                    signature += f"({_types(m.group('dargs'), named=False)})"
                out.append(("drop", signature))
    return out


def live(files: list[Path]) -> tuple[dict[str, Definition], list[Definition]]:
    """The definitions in force after applying ``files`` in order, and those no later
    file supersedes or drops yet that are not in force (none should exist)."""
    items = definitions(files)
    current: dict[str, Definition] = {}
    for item in items:
        if isinstance(item, Definition):
            current[item.signature] = item
        else:
            current.pop(item[1], None)
    dangling = []
    for i, item in enumerate(items):
        if not isinstance(item, Definition):
            continue
        later = [x for x in items[i + 1:]
                 if (x.signature if isinstance(x, Definition) else x[1]) == item.signature]
        if not later and current.get(item.signature) is not item:
            dangling.append(item)
    return current, dangling


def default_files() -> list[Path]:
    return [path for _, path in DEFAULT]


def tenant_files() -> list[Path]:
    return [path for _, path in TENANT]


def test_no_function_or_view_is_defined_twice_in_the_files_migrate_applies() -> None:
    """A protocol change is made in one place: the tenant files define nothing, so tenant
    mode runs the default files' functions; and every definition in an earlier file is
    superseded by a later one of the same signature, or dropped."""
    for path in tenant_files():
        assert _ANY_DEFINITION.findall(path.read_text()) == [], path.name
    plain, dangling = live(default_files())
    assert dangling == []
    tenant, dangling = live(default_files() + tenant_files())
    assert dangling == []
    assert tenant == plain
    # each signature has exactly one definition nothing later replaces
    items = [x for x in definitions(default_files() + tenant_files())
             if isinstance(x, Definition)]
    for signature, definition in plain.items():
        in_force = [d for i, d in enumerate(items) if d.signature == signature
                    and not any(x.signature == signature for x in items[i + 1:])]
        assert in_force == [definition], signature
    api = {s for s in plain if s.startswith("walsync_api.")}
    assert {s.split("(")[0] for s in api} == {
        "walsync_api." + n for n in (
            "push", "pull", "node_status", "head", "conflicts", "lease_acquire", "lease_renew",
            "lease_release", "leases", "state_page", "state_count", "hello", "push_claimed",
            "node_entries", "tenants", "nodes", "node_label", "log_window", "log_page",
            "entry_point", "pull_rows", "pull_scoped", "scope_group", "scope_backfill",
            "log_retention", "compact_log")}
    # today every one of them lives in the consolidated file, but for those a later
    # file added or re-created (each defined once, there)
    assert {d.file[:14] for d in plain.values()} == {CONSOLIDATED, PUSH_IN_PARALLEL,
                                                     NODES_AND_POINTS, SCOPE_AND_RETENTION}


def test_the_released_tenant_files_were_copies_of_the_functions() -> None:
    """What the consolidation removed: the tenant files re-defined the API functions and
    two views, so in tenant mode a second definition of each was in force."""
    files = default_files()[:5] + [path for _, path in RELEASED_TENANT]
    assert [v for v, _ in RELEASED_TENANT] == list(RETIRED_TENANT_VERSIONS)
    plain, _ = live(default_files()[:5])
    tenant, _ = live(files)
    twins = {s for s in plain if s in tenant and tenant[s].file != plain[s].file}
    assert twins == ({s for s in plain if s.startswith("walsync_api.")}
                     - {"walsync_api.push(text,bigint,jsonb)"}
                     | {"walsync.state", "walsync.conflicts"})


# -- databases at every level ----------------------------------------------------------------


@pytest.fixture
def databases(pg_cluster: PostgresCluster) -> Iterator[Callable[..., str]]:
    """``databases(template=None)``: a new empty database (or a copy of ``template``'s)."""
    made: list[str] = []
    numbers = itertools.count(1)

    def make(template: str | None = None) -> str:
        name = f"walsync_m{os.getpid()}_{next(numbers)}"
        dsn = pg_cluster.create_database(name, template and dbname(template))
        made.append(name)
        return dsn

    yield make
    for name in made:
        pg_cluster.drop_database(name)


def apply_files(dsn: str, files: list[tuple[str, Path]]) -> None:
    """What the migrator of an earlier release did: each file once, in the order given."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for version, path in files:
            _apply(conn, version, path, force=False)


def old_tenant_levels() -> list[list[tuple[str, Path]]]:
    """Tenant-mode databases as earlier releases left them: the default files of the time,
    then the tenant files of the time (re-applied after every default file)."""
    t101, t104, t105 = RELEASED_TENANT
    return [[*DEFAULT[:2], t101], [*DEFAULT[:3], t101], [*DEFAULT[:4], t101, t104],
            [*DEFAULT[:5], t101, t104, t105]]


def _acl(column: str) -> str:
    return (f"(select coalesce(array_agg(case when a.grantee = 0 then 'public' "
            f"else pg_get_userbyid(a.grantee) end || ':' || a.privilege_type "
            f"order by 1), '{{}}') from aclexplode({column}) a)")


def catalog(dsn: str) -> dict[str, Any]:
    """The schema as the catalog holds it: tables (columns by name, keys, indexes,
    RLS, owner, privileges), views, functions (source, settings, owner, privileges),
    policies, schema privileges, and tenant mode's setting."""
    def q(sql: str) -> list[list[Any]]:
        return [list(r) for r in query(dsn, sql)]

    ns = "in ('walsync'::regnamespace, 'walsync_api'::regnamespace)"
    return {
        "relations": q(f"""
            select c.relname, c.relkind, c.relrowsecurity, c.relforcerowsecurity,
                   pg_get_userbyid(c.relowner), {_acl('c.relacl')}, c.reloptions,
                   case when c.relkind = 'v' then pg_get_viewdef(c.oid) end
            from pg_class c where c.relnamespace {ns} and c.relkind in ('r', 'v', 'i')
            order by 1"""),
        "columns": q(f"""
            select c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                   pg_get_expr(d.adbin, d.adrelid), a.attcompression, a.attacl::text
            from pg_attribute a join pg_class c on c.oid = a.attrelid
            left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
            where c.relnamespace {ns} and c.relkind in ('r', 'v') and a.attnum > 0
              and not a.attisdropped
            order by 1, 2"""),
        "constraints": q(f"""
            select c.relname, k.conname, pg_get_constraintdef(k.oid)
            from pg_constraint k join pg_class c on c.oid = k.conrelid
            where c.relnamespace {ns} order by 1, 2"""),
        "indexes": q(f"""
            select c.relname, pg_get_indexdef(c.oid) from pg_class c
            where c.relnamespace {ns} and c.relkind = 'i' order by 1"""),
        "functions": q(f"""
            select p.oid::regprocedure::text, pg_get_function_result(p.oid), l.lanname,
                   p.prosrc, p.proconfig, p.prosecdef, p.provolatile, p.proparallel,
                   p.proargnames, pg_get_userbyid(p.proowner),
                   {_acl("coalesce(p.proacl, acldefault('f', p.proowner))")}
            from pg_proc p join pg_language l on l.oid = p.prolang
            where p.pronamespace {ns} order by 1"""),
        "policies": q("""
            select tablename, policyname, permissive, roles::text, cmd, qual, with_check
            from pg_policies where schemaname = 'walsync' order by 1, 2"""),
        "triggers": q(f"""
            select c.relname, t.tgname, pg_get_triggerdef(t.oid) from pg_trigger t
            join pg_class c on c.oid = t.tgrelid
            where c.relnamespace {ns} and not t.tgisinternal order by 1, 2"""),
        "schemas": q(f"""
            select n.nspname, pg_get_userbyid(n.nspowner), {_acl('n.nspacl')}
            from pg_namespace n where n.oid {ns} order by 1"""),
        "tenant_settings": q("select id, claim from walsync.tenant_settings"),
        "server_rows": q("select count(*) from walsync.server"),
    }


def schema_dump(dsn: str) -> str:
    """pg_dump --schema-only of the two schemas, without its session-random lines."""
    info = conninfo_to_dict(dsn)
    done = subprocess.run(
        [str(find_bindir() / "pg_dump"), "-h", str(info["host"]), "-p", str(info["port"]),
         "-U", str(info["user"]), "--schema-only", "-n", "walsync", "-n", "walsync_api",
         str(info["dbname"])],
        capture_output=True, text=True, timeout=120, check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGCONNECT_TIMEOUT": "10"})
    assert done.returncode == 0, done.stderr
    return "\n".join(line for line in done.stdout.splitlines()
                     if not line.startswith(("\\restrict", "\\unrestrict")))


def primary_keys(schema: dict[str, Any]) -> dict[str, str]:
    return {table: definition for table, name, definition in schema["constraints"]
            if definition.startswith("PRIMARY KEY") and table != "schema_migrations"}


#: each table's key without the tenant: in a single-tenant database the tenant closes it
#: (never compared), in tenant mode it leads it (a tenant's rows are adjacent)
KEYS = {"nodes": "node_id", "entries": "origin, lsn, key", "siblings": "key, origin, lsn",
        "leases": "run_id", "fenced": "origin, lsn, key", "key_locks": "key",
        "scope_groups": "name", "collected": "key, origin, lsn"}


def test_every_default_level_migrates_to_the_fresh_schema(
        databases: Callable[..., str]) -> None:
    fresh = databases()
    report = migrate(fresh)
    assert report.applied == [p.name for p in default_files()]
    want, want_dump = catalog(fresh), schema_dump(fresh)
    assert (want["tenant_settings"], want["policies"]) == ([], [])
    assert primary_keys(want) == {
        "head": "PRIMARY KEY (tenant)", "log_settings": "PRIMARY KEY (tenant)",
        "server": "PRIMARY KEY (id)",
        "tenant_settings": "PRIMARY KEY (id)",
        **{t: f"PRIMARY KEY ({k}, tenant)" for t, k in KEYS.items()}}
    assert ["entries_pos", "CREATE UNIQUE INDEX entries_pos ON walsync.entries "
                           "USING btree (tenant, pos)"] in want["indexes"]
    for level in range(1, len(DEFAULT)):
        dsn = databases()
        apply_files(dsn, DEFAULT[:level])
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("select walsync_api.push('A', 2, %s::jsonb)",
                         (json.dumps(records("A", 2, 2)),))
        report = migrate(dsn)
        # an upgrade, not a repair: the files applied before are not applied again
        assert report.applied == [p.name for p in default_files()[level:]], level
        assert report.repaired == [], level
        assert catalog(dsn) == want, f"from level {level}"
        assert schema_dump(dsn) == want_dump, f"from level {level}"
        # what was pushed before is the one tenant's, and the upgraded push goes on from it
        assert query(dsn, "select distinct tenant from walsync.entries") == [("",)]
        assert query(dsn, "select walsync_api.push('A', 3, %s::jsonb) ->> 'head'",
                     (json.dumps(records("A", 1, 1, first_lsn=3)),)) == [("5",)]


def test_every_tenant_mode_path_migrates_to_the_fresh_tenant_schema(
        databases: Callable[..., str]) -> None:
    fresh = databases()
    migrate(fresh, tenant_mode=True)
    want = catalog(fresh)
    assert want["tenant_settings"] == [[1, "tenant_id"]]
    assert len(want["policies"]) == 11
    assert primary_keys(want) == {
        "head": "PRIMARY KEY (tenant)", "log_settings": "PRIMARY KEY (tenant)",
        "server": "PRIMARY KEY (id)",
        "tenant_settings": "PRIMARY KEY (id)",
        **{t: f"PRIMARY KEY (tenant, {k})" for t, k in KEYS.items()}}
    paths: dict[str, str] = {}
    for files in old_tenant_levels():
        dsn = databases()
        apply_files(dsn, files)
        tenant_push(dsn, "A", "n1", records("n1", 2, 1))
        tenant_push(dsn, "", "n1", records("n1", 1, 1))
        report = migrate(dsn)  # plain: tenant mode is found on and stays on
        assert report.tenant_claim == "tenant_id"
        tenants = [p.name for p in tenant_files()]
        assert f"{CONSOLIDATED}_consolidated_api.sql" in report.applied
        assert report.applied[-len(tenants):] == tenants
        paths["+".join(v[-3:] for v, _ in files)] = dsn
    late = databases()  # an old single-tenant database turned to tenant mode
    apply_files(late, DEFAULT[:5])
    migrate(late, tenant_mode=True)
    paths["default 005 then --tenant-mode"] = late
    later = databases()  # a current one turned to tenant mode
    migrate(later)
    migrate(later, tenant_mode=True)
    paths["current then --tenant-mode"] = later
    for label, dsn in paths.items():
        assert catalog(dsn) == want, label
    for label, dsn in paths.items():
        if "+" in label:  # the rows held before: each tenant's, positions per tenant
            assert query(dsn, "select tenant, pos from walsync.head order by 1") == [
                ("", 1), ("A", 2)], label
            assert tenant_push(dsn, "A", "n1", records("n1", 1, 1, first_lsn=3)) == {
                "acked_lsn": 3, "inserted": 1, "merged": 1, "head": 3, "fenced": []}, label


def tenant_push(dsn: str, tenant: str, node: str, batch: list[dict[str, Any]]) -> Any:
    """The JSON form of push as ``tenant`` (a superuser with that JWT claim; '': none)."""
    with psycopg.connect(dsn) as conn:
        if tenant:
            conn.execute("select set_config('request.jwt.claims', %s, true)",
                         (json.dumps({"tenant_id": tenant}),))
        [(ack,)] = conn.execute("select walsync_api.push(%s, %s, %s::jsonb)",
                                (node, max(e["lsn"] for e in batch), json.dumps(batch)))
        return ack


def test_repair_and_reruns_keep_the_schema(databases: Callable[..., str]) -> None:
    for tenant_mode in (False, True):
        dsn = databases()
        migrate(dsn, tenant_mode=tenant_mode)
        want = catalog(dsn)
        assert migrate(dsn).applied == []
        assert catalog(dsn) == want
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("drop function walsync_api.hello(text, jsonb, text, bigint, bigint)")
            conn.execute("drop view walsync.tenant_state_json")
        report = migrate(dsn)
        assert report.repaired == ["walsync_api.hello", "walsync.tenant_state_json"]
        assert catalog(dsn) == want, tenant_mode


def test_each_function_in_the_database_is_its_one_definition_in_the_files(
        databases: Callable[..., str]) -> None:
    """No copy hides anywhere (a DO block, a tenant file): in both modes the source of
    every function of both schemas is the one definition the files hold."""
    plain, _ = live(default_files())
    want = {sig: d.body for sig, d in plain.items() if d.kind == "function"}
    for tenant_mode in (False, True):
        dsn = databases()
        migrate(dsn, tenant_mode=tenant_mode)
        got = {str(sig): str(src) for sig, src in query(dsn, """
            select p.oid::regprocedure::text, p.prosrc from pg_proc p
            where p.pronamespace in ('walsync'::regnamespace, 'walsync_api'::regnamespace)""")}
        assert got == want, tenant_mode


# -- answers: the upgraded functions answer as the ones they replace ------------------------

_VOLATILE = {"expires_at", "now", "last_push_at", "last_pull_at"}


def _stable(value: Any) -> Any:
    """An answer without its clock readings."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _jsonb_push(node: str, through: int, batch: list[dict[str, Any]]) -> tuple[str, Any]:
    return f"select walsync_api.push('{node}', {through}, %s::jsonb)", (json.dumps(batch),)


_NO_ENTRIES = ("array[]::bigint[], array[]::int[], array[]::text[], array[]::boolean[], "
               "array[]::bytea[], array[]::smallint[], array[]::jsonb[], array[]::bigint[], "
               "array[]::bigint[], array[]::text[], array[]::text[]")
_ONE_ENTRY = ("array[1]::bigint[], array[0]::int[], array['k/n5']::text[], "
              "array[false]::boolean[], array['\\x01'::bytea]::bytea[], array[0]::smallint[], "
              "array['{\"n5\": 1}']::jsonb[], array[458752]::bigint[], array[0]::bigint[], "
              "array[null]::text[], array[null]::text[]")

#: (label, SQL, parameters): every function, on the paths their answers differ by
_CALLS: list[tuple[str, str, Any]] = [
    ("push", *_jsonb_push("n1", 3, records("n1", 3, 2))),
    ("re-push", *_jsonb_push("n1", 3, records("n1", 3, 2))),
    ("conflict", *_jsonb_push("n2", 1, [entry("n2", 1, "k/n1/1/0", "concurrent")])),
    ("dominate", *_jsonb_push("n2", 2, [entry("n2", 2, "k/n1/2/0", "newer", {"n1": 2, "n2": 2})])),
    ("tombstone", *_jsonb_push("n2", 3, [entry("n2", 3, "k/n1/2/1", None, {"n1": 2, "n2": 3})])),
    ("lease", "select walsync_api.lease_acquire('r1', 'n1', 600)", None),
    ("lease taken", "select walsync_api.lease_acquire('r1', 'n7', 600)", None),
    ("holder write", *_jsonb_push("n1", 4, [{**entry("n1", 4, "runs/r1", {"s": 1}), "fence": 1}])),
    ("other's write", *_jsonb_push("n7", 1, [{**entry("n7", 1, "runs/r1", {"s": 9}), "fence": 1}])),
    ("unfenced write", *_jsonb_push("n1", 5, [entry("n1", 5, "runs/r1/steps/2", {"x": 1})])),
    ("renew", "select walsync_api.lease_renew('r1', 'n1', 1, 600)", None),
    ("renew lost", "select walsync_api.lease_renew('r1', 'n7', 1, 600)", None),
    ("leases", "select walsync_api.leases(null)", None),
    ("leases of", "select walsync_api.leases('n7')", None),
    ("release", "select walsync_api.lease_release('r1', 'n1', 1)", None),
    ("release again", "select walsync_api.lease_release('r1', 'n1', 5)", None),
    ("take expired", "select walsync_api.lease_acquire('r1', 'n7', 600)", None),
    ("pull", "select walsync_api.pull('n3', 0, 3)", None),
    ("pull rest", "select walsync_api.pull('n3', 4, 100)", None),
    ("pull own", "select walsync_api.pull('n1', 0, 100)", None),
    ("status", "select walsync_api.node_status('n1')", None),
    ("status puller", "select walsync_api.node_status('n3')", None),
    ("status unknown", "select walsync_api.node_status('nobody')", None),
    ("head", "select walsync_api.head()", None),
    ("conflicts", "select walsync_api.conflicts('', 10)", None),
    ("conflicts prefix", "select walsync_api.conflicts('k/n1/1', 10)", None),
    ("conflicts escaped", "select walsync_api.conflicts('k_n1', 10)", None),
    ("state page", "select walsync_api.state_page('', null, 2)", None),
    ("state page after", "select walsync_api.state_page('k/', 'k/n1/1/1', 100)", None),
    ("state count", "select walsync_api.state_count('k/')", None),
    ("claim", "select walsync_api.hello('n5', '[]', 'tok1', 0, 0)", None),
    ("still held", "select walsync_api.hello('n5', '[\"tok1\"]', null, 0, 0)", None),
    ("taken", "select walsync_api.hello('n5', '[]', 'tok2', 0, 0)", None),
    ("ahead", "select walsync_api.hello('n1', '[]', 'tok3', 0, 0)", None),
    ("claimed push", f"select walsync_api.push_claimed('n5', 'tok1', 0, 0, 1, {_ONE_ENTRY})",
     None),
    ("claimed push taken",
     f"select walsync_api.push_claimed('n5', 'tok9', 0, 1, 2, {_NO_ENTRIES})", None),
    ("claimed push behind",
     f"select walsync_api.push_claimed('n5', 'tok1', 0, 9, 10, {_NO_ENTRIES})", None),
    ("claimed ack only",
     f"select walsync_api.push_claimed('n5', 'tok1', 0, 1, 2, {_NO_ENTRIES})", None),
    ("node entries", "select walsync_api.node_entries('n1', 0, 10)", None),
    ("node entries fenced", "select walsync_api.node_entries('n7', 0, 10)", None),
    ("no node", "select walsync_api.push('', 1, '[]'::jsonb)", None),
    ("short arrays", "select walsync_api.push('n1', 1, array[1]::bigint[], "
     + _NO_ENTRIES.split(", ", 1)[1] + ")", None),
    ("bad ttl", "select walsync_api.lease_acquire('r2', 'n1', 0)", None),
    ("status after", "select walsync_api.node_status('n5')", None),
    ("head after", "select walsync_api.head()", None),
]


def answers(dsn: str, tenants: list[str]) -> list[Any]:
    """Every call of the script as each tenant in turn ('' : no claim), with its answer
    or its error (SQLSTATE and message); the lease expires in between."""
    out: list[Any] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for label, sql, params in _CALLS:
            if label == "take expired":
                conn.execute("update walsync.leases set expires_at = now() - interval '1 s'")
            for tenant in tenants:
                claims = json.dumps({"tenant_id": tenant}) if tenant else ""
                with conn.transaction():
                    conn.execute("select set_config('request.jwt.claims', %s, true)", (claims,))
                    try:
                        with conn.transaction():
                            [(answer,)] = conn.execute(sql, params).fetchall()
                        out.append((label, tenant, _stable(answer)))
                    except psycopg.Error as exc:
                        out.append((label, tenant, exc.sqlstate, str(exc).splitlines()[0]))
    return out


@pytest.mark.parametrize("tenant_mode", [False, True], ids=["default", "tenant"])
def test_upgraded_functions_answer_as_the_ones_they_replace(
        databases: Callable[..., str], tenant_mode: bool) -> None:
    """Two copies of one database from before the consolidation, one upgraded: the same
    calls (pushes, duplicates, conflicts, fencing, leases, pulls, pages, claims, errors;
    as several tenants in tenant mode) get the same answers from both."""
    old = databases()
    apply_files(old, DEFAULT[:5] + (RELEASED_TENANT if tenant_mode else []))
    new = databases(template=old)
    report = migrate(new)
    assert report.applied[0] == f"{CONSOLIDATED}_consolidated_api.sql"
    assert ("require_tenant()" in query(old, "select prosrc from pg_proc "
                                             "where proname = 'pull'")[0][0]) is tenant_mode
    tenants = ["", "A", "B"] if tenant_mode else [""]
    before = answers(old, tenants)
    assert answers(new, tenants) == before
    assert len(before) == len(_CALLS) * len(tenants)
    # the script reaches what it means to: a fenced write, a conflict, a refused claim
    got = {(label, tenant): rest for label, tenant, *rest in before}
    assert got[("other's write", "")][0]["fenced"] == [
        {"run_id": "r1", "current": 1, "holder": "n1"}]
    assert got[("conflicts", "")][0] == [{"key": "k/n1/1/0", "versions": 2}]
    assert got[("taken", "")][0]["reason"] == "taken"
    assert got[("claimed push behind", "")][0]["refused"] == "behind"
    assert got[("no node", "")][0] == "22023"
    tenant = "tenant" if tenant_mode else "''::text"
    for sql in ("select {t}, pos, origin, lsn, key, md5(data) from walsync.entries",
                "select {t}, key, origin, lsn, deleted, md5(data) from walsync.siblings",
                "select {t}, origin, lsn, key, run_id, fence, current, holder, md5(data) "
                "from walsync.fenced",
                "select {t}, node_id, acked_lsn, acked_hlc, pull_cursor, incarnation "
                "from walsync.nodes",
                "select {t}, run_id, holder, token from walsync.leases",
                "select {t}, pos from walsync.head"):
        assert sorted(query(new, sql.format(t="tenant"))) == sorted(
            query(old, sql.format(t=tenant))), sql
