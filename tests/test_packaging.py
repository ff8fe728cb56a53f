"""The package layout users install: one import root, every package folder shipped.

The repository keeps `engine/` and `sync/` at its root while users import
`walsync.engine` and `walsync.sync` (setuptools' package-dir maps them), so two
things can drift: a new package folder missing from pyproject's explicit list
(it would be absent from a built wheel while the editable checkout still works),
and a second copy of a module under its bare folder name (two `Store` classes,
two error hierarchies, `isinstance` checks that fail).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def test_every_package_folder_is_listed_for_setuptools() -> None:
    setuptools = _pyproject()["tool"]["setuptools"]  # type: ignore[index]
    listed = set(setuptools["packages"])
    mapping = setuptools["package-dir"]
    found = set()
    for root_name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join((root_name, *rel.parts)))
    assert found == listed, f"pyproject packages differ from the folders: {found ^ listed}"


def test_the_distribution_name_is_not_the_unrelated_walsync() -> None:
    project = _pyproject()["project"]  # type: ignore[index]
    assert project["name"] == "walsync-store"
    # the CLI's group is walsync.sync.cli:main; the script enters through a module that
    # catches a Ctrl-C while that loads (sync/console.py)
    assert project["scripts"]["walsync"] == "walsync.sync.console:main"


@pytest.mark.parametrize("bare", ["engine", "sync"])
def test_bare_folder_names_are_refused(bare: str) -> None:
    done = subprocess.run([sys.executable, "-c", f"import {bare}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"import walsync.{bare}" in done.stderr


def test_one_import_root_from_anywhere(tmp_path: Path) -> None:
    code = ("import walsync.engine, walsync.sync.cli; "
            "from walsync.engine import Store; print(Store.__module__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("walsync.engine.")
