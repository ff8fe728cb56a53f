"""sync/PROTOCOL.md's tables, read and held to the code they describe.

Someone writing a client, a dashboard or a migration reads PROTOCOL.md, not the
SQL: a function, table or view the migrations define and the document leaves out
(or one it lists that no migration makes), a transport call naming a function
the server lacks, or an error class whose codes differ from what the clients
classify, is a protocol nobody can implement from its document. (The table of
transports and `Transport`'s methods is read by tests/sync/test_transport_contract.py.)
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from postgrest.exceptions import APIError

from walsync.engine.errors import (
    RemoteAuthError,
    RemoteSchemaError,
    RemoteUnavailableError,
    SyncError,
)
from walsync.sync.remote import error_for_sqlstate
from walsync.sync.supabase import classify_api_error

ROOT = Path(__file__).resolve().parent.parent
SYNC = ROOT / "sync"
PROTOCOL = (SYNC / "PROTOCOL.md").read_text()
#: every migration, default and tenant mode (tenant mode may only add policies and
#: grants, but what it defines is the server's too)
MIGRATIONS = sorted((SYNC / "migrations").rglob("*.sql"), key=lambda p: p.name)


def _section(title: str) -> str:
    """The text of the section headed ``## title`` (up to the next ``## ``)."""
    head = f"\n## {title}\n"
    assert head in PROTOCOL, f"PROTOCOL.md has no section {title!r}"
    return PROTOCOL.split(head, 1)[1].split("\n## ", 1)[0]


def _rows(section: str, header: str) -> list[list[str]]:
    """The body rows of the table whose header row starts with ``| header |``, as cells."""
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def _defined(kind: str, schema: str) -> set[str]:
    """Names of ``schema``'s objects of ``kind`` (table, view, function) the
    migrations leave defined, read in the order they run."""
    pattern = re.compile(
        rf"\b(create|drop)\s+(?:or\s+replace\s+)?{kind}\s+(?:if\s+(?:not\s+)?exists\s+)?"
        rf"{schema}\.(\w+)", re.IGNORECASE)
    names: set[str] = set()
    for path in MIGRATIONS:
        for verb, name in pattern.findall(path.read_text()):
            if verb.lower() == "create":
                names.add(name.lower())
            else:
                names.discard(name.lower())
    return names


def _documented_functions() -> set[str]:
    rows = _rows(_section("Functions (`walsync_api`)"), "function")
    return {re.match(r"`(\w+)\(", row[0]).group(1) for row in rows}  # type: ignore[union-attr]


def test_the_functions_table_lists_every_api_function_the_migrations_define() -> None:
    sql = _defined("function", "walsync_api")
    documented = _documented_functions()
    missing, extra = sorted(sql - documented), sorted(documented - sql)
    assert not missing, f"functions the Functions table of PROTOCOL.md does not list: {missing}"
    assert not extra, f"functions PROTOCOL.md lists and no migration makes: {extra}"


def test_every_function_a_transport_calls_is_documented_and_in_its_table() -> None:
    """The Transports table names, per method, the functions it calls; the clients'
    calls by name (sync/*.py) are exactly those."""
    rows = _rows(_section("Transports"), "method")
    named: set[str] = set()
    for row in rows:
        if row[1] != "none":
            # function names are snake_case; a type named beside them (`Claim`) is not one
            named.update(re.findall(r"`([a-z_]+)`", row[1]))
    called = set()
    for path in SYNC.glob("*.py"):
        called.update(re.findall(r"\.call\(\s*\"(\w+)\"", path.read_text()))
    assert called, "the scan found no call by name"
    assert not called - named, f"calls the Transports table does not name: {called - named}"
    assert not named - called, f"the Transports table names calls nothing makes: {named - called}"
    undocumented = named - _documented_functions()
    assert not undocumented, f"calls not in the Functions table: {undocumented}"


def test_the_tables_table_lists_every_table() -> None:
    rows = _rows(_section("Tables"), "table")
    documented = {re.fullmatch(r"`walsync\.(\w+)`", row[0]).group(1)  # type: ignore[union-attr]
                  for row in rows}
    made = _defined("table", "walsync")
    # the migrator's own ledger is made by sync/migrate.py, before any migration runs
    made |= set(re.findall(r"create table if not exists walsync\.(\w+)",
                           (SYNC / "migrate.py").read_text()))
    assert not made - documented, f"tables PROTOCOL.md does not list: {made - documented}"
    assert not documented - made, f"tables PROTOCOL.md lists and nothing makes: {documented - made}"


def test_the_views_paragraph_names_every_view() -> None:
    section = _section("Tables")
    paragraph = section.split("\nViews: ", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"`walsync\.(\w+)`", paragraph))
    assert documented == _defined("view", "walsync")


# -- the error classes ---------------------------------------------------------------

_CLASSES: dict[str, type[SyncError]] = {
    "transient": RemoteUnavailableError,
    "auth": RemoteAuthError,
    "schema": RemoteSchemaError,
}


def _expand(code: str) -> list[str]:
    """A documented code as codes: ``57P01-3`` is 57P01..57P03, ``PGRST000-003`` is
    PGRST000..PGRST003, ``08xxx`` a class (a representative member)."""
    if code.endswith("xxx"):
        return [code[:2] + "006"]
    if "-" in code:
        first, last = code.split("-")
        stem = first[: len(first) - len(last)]
        lo, hi = int(first[len(stem):]), int(last)
        return [f"{stem}{n:0{len(last)}d}" for n in range(lo, hi + 1)]
    return [code]


def _documented_codes() -> dict[str, tuple[set[str], set[int]]]:
    """Per error class: its SQLSTATE / PostgREST codes and its HTTP statuses."""
    out = {}
    for row in _rows(_section("Errors"), "class"):
        if row[0] not in _CLASSES:
            continue
        codes = {c for code in re.findall(r"`([0-9A-Zx-]+)`", row[1]) for c in _expand(code)}
        statuses: set[int] = set()
        for http in re.findall(r"HTTP ([0-9x /]+)", row[1]):
            statuses |= {500 if s == "5xx" else int(s) for s in http.replace(" ", "").split("/")
                         if s}
        out[row[0]] = (codes, statuses)
    return out


def _classified(code: str, status: int | None = None) -> SyncError:
    return classify_api_error(APIError({"code": code, "message": "m"}), "test", status)


def test_the_errors_table_has_its_classes() -> None:
    assert set(_documented_codes()) == set(_CLASSES)


@pytest.mark.parametrize("name", sorted(_CLASSES))
def test_each_documented_code_is_classified_as_its_row_says(name: str) -> None:
    codes, statuses = _documented_codes()[name]
    assert codes
    wrong = {c: type(_classified(c)).__name__ for c in codes
             if type(_classified(c)) is not _CLASSES[name]}
    wrong |= {str(s): type(_classified("", s)).__name__ for s in statuses
              if type(_classified("", s)) is not _CLASSES[name]}
    assert not wrong, f"PROTOCOL.md says {name}, the clients classify otherwise: {wrong}"


def _codes_in(path: Path, function: str) -> set[str]:
    """The code literals (SQLSTATEs, PGRSTnnn) one function of a client module compares
    against (and the module-level sets it reads)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if (isinstance(node, ast.FunctionDef) and node.name == function) or isinstance(
                node, ast.Assign):
            found |= {n.value for n in ast.walk(node) if isinstance(n, ast.Constant)
                      and isinstance(n.value, str)
                      and re.fullmatch(r"(?=.*\d)[0-9A-Z]{5}|PGRST\d{3}", n.value)}
    return found


def test_every_code_the_clients_classify_is_in_the_errors_table() -> None:
    """The other way round: a code the code treats specially and the table omits
    would be retried (or not) behind the reader's back."""
    documented = set().union(*(codes for codes, _ in _documented_codes().values()))
    in_code = (_codes_in(SYNC / "remote.py", "error_for_sqlstate")
               | _codes_in(SYNC / "supabase.py", "classify_api_error"))
    assert in_code, "the scan found no code"
    assert not in_code - documented, f"codes the Errors table omits: {in_code - documented}"
    # the class prefix the code tests ('08': connection exceptions) is a documented class
    assert type(error_for_sqlstate("08001", "m")) is RemoteUnavailableError
    assert type(_classified("XX000")) is not RemoteUnavailableError  # 'anything else'


def test_the_table_reader_reads_ranges_and_classes() -> None:
    assert _expand("57P01-3") == ["57P01", "57P02", "57P03"]
    assert _expand("PGRST300-303") == ["PGRST300", "PGRST301", "PGRST302", "PGRST303"]
    assert _expand("08xxx") == ["08006"]
    assert _expand("42501") == ["42501"]
