"""Guards on what the project says about itself: its own documents, not outside ones.

Code, tests and docs cite the project's own documents (FORMAT.md, PROTOCOL.md,
EXPORT.md, README): a reader of the repository has those, and they change with
the code. A citation of a document outside it is a reference nobody can follow.
"""

from __future__ import annotations

import re
from pathlib import Path

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
