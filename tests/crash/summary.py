"""Per-test kill counts of a crash suite, written to the terminal when the module ends.

Each crash test asserts its own floor of kills; the summary shows the counts
(and their sum) in a normal, captured run, so that "at least 1,000 kill points
per CI run" can be read off the CI log.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest


@dataclass
class KillSummary:
    module: str
    rows: list[tuple[str, int, int, str]] = field(default_factory=list)
    #: what is counted (the fault suites use it for their cases)
    what: str = "crash kills"

    def add(self, test: str, kills: int, floor: int, detail: str = "") -> None:
        """One row per label: a label added again (one per parametrized case, say)
        adds to its row."""
        for i, (label, k, f, d) in enumerate(self.rows):
            if label == test:
                self.rows[i] = (label, k + kills, f + floor, d if d == detail else "")
                return
        self.rows.append((test, kills, floor, detail))

    def lines(self) -> list[str]:
        total = sum(kills for _, kills, _, _ in self.rows)
        out = [f"{self.what} in {self.module}: {total} "
               f"(floor {sum(floor for _, _, floor, _ in self.rows)})"]
        out.extend(f"  {kills:5d} (floor {floor}) {test}{': ' + detail if detail else ''}"
                   for test, kills, floor, detail in self.rows)
        return out


def kill_summary_fixture(request: pytest.FixtureRequest,
                         what: str = "crash kills") -> Iterator[KillSummary]:
    """The body of a module-scoped ``kill_summary`` (or ``fault_summary``) fixture."""
    summary = KillSummary(request.module.__name__, what=what)
    yield summary
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or not summary.rows:
        return
    # past output capturing, as capsys.disabled() does: shown in a passing run too
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write("\n")
        for line in summary.lines():
            reporter.write_line(line)
