"""Guards on what the project says about itself, so that it stays true.

* Code, tests and docs cite the project's own documents (FORMAT.md, PROTOCOL.md,
  EXPORT.md, README): a reader of the repository has those, and they change with
  the code. A citation of a document outside it is a reference nobody can follow.
* Every public module's ``__all__`` is its whole public face: what a reader (and
  ``from m import *``, and the docs) takes for API is what is tested as API.
* Each FORMAT.md invariant and each README guarantee names the tests that prove
  it, and those tests exist: a renamed or deleted test cannot leave a promise
  unproved without this failing.
* A module over 500 lines says why at its top.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent

#: where the project's own text lives
_SCANNED_DIRS = ("engine", "sync", "tests", "bench", "fuzz")
_SCANNED_SUFFIXES = {".py", ".md", ".sql", ".toml", ".txt", ".json"}
#: an outside product specification, cited by its name (with a section number, a
#: section sign or its file name); spelled in two pieces so that this file does not cite it
_OUTSIDE_SPEC = re.compile(r"\b" + "SP" + r"EC\b")


def _project_text_files() -> list[Path]:
    found = [ROOT / "README.md", ROOT / "pyproject.toml"]
    for folder in _SCANNED_DIRS:
        found += [p for p in (ROOT / folder).rglob("*")
                  if p.suffix in _SCANNED_SUFFIXES and p.is_file()
                  and "__pycache__" not in p.parts]
    return sorted(found)


def test_the_scan_sees_the_project() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in _project_text_files()}
    assert {"README.md", "engine/FORMAT.md", "sync/PROTOCOL.md", "engine/store.py",
            "tests/test_guards.py"} <= names


@pytest.mark.parametrize("path", _project_text_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_projects_own_documents_are_cited(path: Path) -> None:
    bad = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
           for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
           if _OUTSIDE_SPEC.search(line)]
    assert not bad, ("cite the project's own documents (README, FORMAT.md, PROTOCOL.md, "
                     "EXPORT.md) by section instead:\n" + "\n".join(bad))


def test_the_citation_guard_catches_a_citation() -> None:
    assert _OUTSIDE_SPEC.search("the resume rules (" + "SP" + "EC 3.2)")
    assert _OUTSIDE_SPEC.search("see " + "SP" + "EC.md")
    assert not _OUTSIDE_SPEC.search("_SPECIAL = frozenset()")
    assert not _OUTSIDE_SPEC.search("INSPECT_FIELDS")


# -- every public module's __all__ is its public face, complete ---------------------

#: the import root of each folder (pyproject.toml's package-dir)
_PACKAGES = {"walsync.engine": ROOT / "engine", "walsync.sync": ROOT / "sync"}


def _public_modules() -> list[tuple[str, Path]]:
    """Modules no part of whose dotted name starts with '_' (those are private)."""
    found = []
    for package, folder in _PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if "__pycache__" in path.parts or any(p.startswith("_") for p in parts):
                continue
            found.append((".".join([package, *parts]), path))
    return found


def _is_call_to(value: ast.expr | None, *names: str) -> bool:
    """Whether ``value`` is a call of a function spelled ``name`` or ``module.name``."""
    if not isinstance(value, ast.Call):
        return False
    func = value.func
    spelled = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return spelled in names


def _defined_public_names(tree: ast.Module) -> list[str]:
    """Public names a module defines at its top level (not those it imports).

    Not API, so not asked for: the module's logger (``logging.getLogger``) and type
    variables, which are typing devices."""
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            value = node.value
            if _is_call_to(value, "getLogger", "TypeVar", "ParamSpec"):
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [t.id for t in targets if isinstance(t, ast.Name)]
    return [n for n in names if not n.startswith("_") and n != "__all__"]


def _cli_commands(module: ModuleType) -> set[str]:
    """Names of the click commands a CLI topic module registers through COMMANDS
    (groups with their subcommands): a topic module's face is its COMMANDS."""
    reached: set[int] = set()
    todo = list(getattr(module, "COMMANDS", []))
    while todo:
        command = todo.pop()
        reached.add(id(command))
        if isinstance(command, click.Group):
            todo += list(command.commands.values())
    return {name for name, value in vars(module).items()
            if isinstance(value, click.Command) and id(value) in reached}


@pytest.mark.parametrize(("name", "path"), _public_modules(), ids=lambda x: str(x)
                         if isinstance(x, str) else "")
def test_every_public_module_lists_its_whole_public_face(name: str, path: Path) -> None:
    module = importlib.import_module(name)
    listed = getattr(module, "__all__", None)
    assert isinstance(listed, list | tuple), f"{name} ({path.relative_to(ROOT)}) has no __all__"
    absent = [n for n in listed if not hasattr(module, n)]
    assert not absent, f"{name}.__all__ lists names it does not have: {absent}"
    assert len(set(listed)) == len(listed), f"{name}.__all__ lists a name twice"
    tree = ast.parse(path.read_text(), str(path))
    unlisted = [n for n in _defined_public_names(tree)
                if n not in listed and n not in _cli_commands(module)]
    assert not unlisted, (f"{name} ({path.relative_to(ROOT)}) defines public names its "
                          f"__all__ leaves out: {unlisted}; list them, or name them with a "
                          "leading '_' if they are the module's own")


#: the layers' faces: packages whose __init__ only gathers what its modules define
_FACES = ("walsync.engine", "walsync.engine.workflow", "walsync.engine.snapshot",
          "walsync.engine.integrations", "walsync.sync")


@pytest.mark.parametrize("name", _FACES)
def test_a_layer_face_exports_what_it_imports(name: str) -> None:
    """A face imports to re-export: a public name it takes in from its modules and
    leaves out of __all__ is API by accident (reachable, undocumented, untested)."""
    module = importlib.import_module(name)
    path = Path(str(module.__file__))
    imported: list[str] = []
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            imported += [a.asname or a.name for a in node.names]
    unlisted = [n for n in imported if not n.startswith("_") and n not in module.__all__
                and not isinstance(getattr(module, n), ModuleType)]
    assert not unlisted, f"{name} imports {unlisted} without listing them in __all__"


def test_the_public_face_check_reads_a_module_as_written() -> None:
    tree = ast.parse("import logging\nfrom typing import TypeVar\nlog = logging.getLogger('x')\n"
                     "T = TypeVar('T')\nLIMIT = 3\n_own = 1\ndef api(): ...\nclass Thing: ...\n")
    assert _defined_public_names(tree) == ["LIMIT", "api", "Thing"]
    assert {n for n, _ in _public_modules()} >= {
        "walsync.engine", "walsync.sync", "walsync.engine.workflow", "walsync.engine.store",
        "walsync.sync.replicator", "walsync.sync.cli.store_cmds"}
    assert not any(n.rsplit(".", 1)[-1].startswith("_") for n, _ in _public_modules())


# -- every invariant and guarantee names the tests that prove it, and they exist -------

_NODE = re.compile(r"`(tests/[\w/]+\.py::\w+)`")


def _format_invariants() -> list[str]:
    """engine/FORMAT.md's numbered invariants, each as its text."""
    text = (ROOT / "engine" / "FORMAT.md").read_text()
    section = text.split("\n## Invariants\n", 1)[1].split("\n## ", 1)[0]
    return [item for item in re.split(r"\n(?=\d+\. )", section.strip()) if item[:1].isdigit()]


def _readme_guarantees() -> list[tuple[str, list[str]]]:
    """README's table "Which tests prove each guarantee": (guarantee, node ids)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n### Which tests prove each guarantee\n", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][2:]
    return [(row.split(" | ")[0][2:], _NODE.findall(row)) for row in rows]


def _collected(node_ids: set[str]) -> set[str]:
    """The node ids pytest collects from the files ``node_ids`` name."""
    files = sorted({n.split("::")[0] for n in node_ids})
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         *files], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {line.strip() for line in done.stdout.splitlines() if "::" in line}


def _missing(named: set[str], collected: set[str]) -> list[str]:
    """Named tests pytest does not collect (a parametrized test, or a test class,
    counts when any of its cases is collected)."""
    return sorted(n for n in named
                  if not any(c == n or c.startswith((n + "[", n + "::")) for c in collected))


def test_every_format_invariant_names_the_tests_that_prove_it() -> None:
    invariants = _format_invariants()
    assert len(invariants) >= 8
    unproved = [item.split("\n", 1)[0] for item in invariants
                if "Proved by:" not in item or not _NODE.search(item.split("Proved by:")[1])]
    assert not unproved, f"FORMAT.md invariants without a 'Proved by:' test: {unproved}"


def test_every_readme_guarantee_names_the_tests_that_prove_it() -> None:
    rows = _readme_guarantees()
    assert len(rows) >= 10
    assert not [g for g, nodes in rows if not nodes], "a guarantee without a test"
    # each bullet of "Guarantees and non-goals" but the non-goals has its row
    text = (ROOT / "README.md").read_text()
    bullets = text.split("\n## Guarantees and non-goals\n", 1)[1].split("\n#", 1)[0]
    promises = [b for b in re.split(r"\n- ", "\n" + bullets.strip())
                if b.strip() and not b.startswith("Not in scope")]
    assert len(rows) >= len(promises) + 2  # and the durability promise's two levels


def test_every_test_an_invariant_or_a_guarantee_names_exists() -> None:
    named = {n for item in _format_invariants() for n in _NODE.findall(item)}
    named |= {n for _, nodes in _readme_guarantees() for n in nodes}
    missing = _missing(named, _collected(named))
    assert not missing, f"FORMAT.md or README names tests pytest does not collect: {missing}"


def test_a_renamed_test_is_caught() -> None:
    collected = {"tests/a.py::test_x[1]", "tests/a.py::test_x[2]", "tests/b.py::test_y",
                 "tests/c.py::test_model::runTest"}
    assert _missing({"tests/a.py::test_x", "tests/b.py::test_y", "tests/c.py::test_model"},
                    collected) == []
    assert _missing({"tests/a.py::test_x_old", "tests/b.py::test"}, collected) == [
        "tests/a.py::test_x_old", "tests/b.py::test"]


# -- a module over ~500 lines says why at its top ---------------------------------------

_LONG_LINES = 500


def _long_modules() -> list[Path]:
    return [path for _, path in _public_modules()
            if path.read_text().count("\n") > _LONG_LINES]


@pytest.mark.parametrize("path", _long_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_over_500_lines_states_why_at_its_top(path: Path) -> None:
    """A long module is where a second concern hides; the one that is long for a reason
    says it where a reader starts (its docstring names the 500-line mark and why)."""
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert str(_LONG_LINES) in docstring, (
        f"{path.relative_to(ROOT)} has {path.read_text().count(chr(10))} lines and its "
        f"docstring does not say why it is over {_LONG_LINES} (split it, or say why not)")
