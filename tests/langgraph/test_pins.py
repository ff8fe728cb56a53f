"""The LangGraph pins: CI's lowest-pins run (constraints-lowest.txt) tests exactly the
floors pyproject.toml declares, and the installed versions are within them."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = Path(__file__).with_name("constraints-lowest.txt")
PINNED = ("langgraph-checkpoint", "langgraph", "langgraph-checkpoint-sqlite",
          "langgraph-checkpoint-conformance")


def declared() -> dict[str, Requirement]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    found = [Requirement(r) for r in extras["langgraph"] + extras["dev"]]
    return {r.name: r for r in found if r.name in PINNED}


def floor(requirement: Requirement) -> Version:
    (lowest,) = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    return lowest


def lowest_pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, pinned = line.split("==")
            pins[name.strip()] = Version(pinned)
    return pins


def test_lowest_pins_are_the_declared_floors() -> None:
    requirements = declared()
    assert sorted(requirements) == sorted(PINNED)
    assert lowest_pins() == {name: floor(r) for name, r in requirements.items()}


def test_installed_versions_are_within_the_pins() -> None:
    for name, requirement in declared().items():
        assert requirement.specifier.contains(version(name)), (name, version(name))
