"""Which way imports may point: sync builds on the engine, the workflow layer on the
store, integrations on the workflow layer; never the other way round.

An import that points back up (the store importing the replicator, the disk core
importing run keys) is how a storage engine grows a second, hidden public API and
how a change to the workflow layer ends up breaking recovery.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"

def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved)."""
    package = ["walsync", *path.parent.relative_to(ROOT).parts]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def _engine_files(*, within: str | None = None) -> list[Path]:
    base = ENGINE / within if within else ENGINE
    return sorted(p for p in base.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", _engine_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_engine_never_imports_sync(path: Path) -> None:
    bad = sorted(m for m in _imports(path) if m == "walsync.sync" or m.startswith("walsync.sync."))
    assert not bad, f"{path.relative_to(ROOT)} imports the sync layer: {bad}"


def _core_files() -> list[Path]:
    return [p for p in _engine_files()
            if p.relative_to(ENGINE).parts[0] not in ("workflow", "integrations")]


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_store_never_imports_the_workflow_layer_or_integrations(path: Path) -> None:
    above = ("walsync.engine.workflow", "walsync.engine.integrations")
    bad = sorted(m for m in _imports(path) if m.startswith(above))
    assert not bad, f"{path.relative_to(ROOT)} imports a layer above the store: {bad}"


@pytest.mark.parametrize("path", _engine_files(within="workflow"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_workflow_layer_never_imports_integrations(path: Path) -> None:
    bad = sorted(m for m in _imports(path) if m.startswith("walsync.engine.integrations"))
    assert not bad, f"{path.relative_to(ROOT)} imports an integration: {bad}"


def test_the_checker_sees_relative_imports() -> None:
    """The rule is only as good as the parser: a relative import must resolve."""
    found = _imports(ENGINE / "workflow" / "export.py")
    assert "walsync.engine.workflow.keys" in found
    assert "walsync.engine.export.write_export" in found
