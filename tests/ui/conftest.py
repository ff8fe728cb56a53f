"""Fixtures of the dashboard suites: stores made by the demo, servers, a writer beside them.

A dashboard started here serves from a thread of the test process and holds
the store open read-only; LMDB must not open one environment twice in a
process, so while it runs the tests read the store through its API only, and
writes beside it come from a child process (``writer``), as in real use.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.ui.stores import ROOT, add_showcase_runs_in_child, make_demo_store
from walsync.engine import Store
from walsync.engine.workflow import Cost, Workflows
from walsync.sync.ui import DashboardServer, serve


@dataclass(frozen=True)
class DemoStore:
    path: Path
    run_id: str
    #: the run's summed cost and each step's, as the library reads them
    run_cost: Cost
    step_costs: dict[str, Cost]
    steps: list[str]


def _facts(path: Path, run_id: str) -> DemoStore:
    with Store.open(path, readonly=True) as store:
        run = Workflows(store).get_run(run_id)
        return DemoStore(path, run_id, run.cost,
                         {s.step_id: Cost.from_dict(s.cost) for s in run.ordered_steps()},
                         [s.step_id for s in run.ordered_steps()])


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> DemoStore:
    """`walsync demo --crash-after 3; walsync demo`: one run, charge_cards crashed and resumed."""
    path = tmp_path_factory.mktemp("ui-demo") / "store"
    return _facts(path, make_demo_store(path))


@pytest.fixture(scope="module")
def showcase_store(tmp_path_factory: pytest.TempPathFactory,
                   demo_store: DemoStore) -> DemoStore:
    """A copy of the demo's store plus runs in every other state (tests/ui/stores.py)."""
    path = tmp_path_factory.mktemp("ui-showcase") / "store"
    shutil.copytree(demo_store.path, path)
    add_showcase_runs_in_child(path)
    return _facts(path, demo_store.run_id)


@pytest.fixture
def store_copy(tmp_path: Path) -> Callable[[Path], Path]:
    """A private copy of a (closed) store, for tests that change it."""

    def copy(source: Path) -> Path:
        target = tmp_path / "copy"
        shutil.copytree(source, target)
        return target

    return copy


@pytest.fixture
def ui() -> Iterator[Callable[..., DashboardServer]]:
    """``ui(path, allow_actions=False, environ={})``: a dashboard on a free loopback port."""
    servers: list[DashboardServer] = []

    def start(path: Path, *, allow_actions: bool = False,
              environ: Mapping[str, str] | None = None) -> DashboardServer:
        server = serve(path, port=0, allow_actions=allow_actions,
                       environ={} if environ is None else environ).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def request(server: DashboardServer, method: str, path: str, body: Any = None,
            headers: Mapping[str, str] | None = None, *, token: bool = True,
            raw: bytes | None = None) -> tuple[int, Any]:
    """One HTTP request to ``server``; (status, decoded JSON or text)."""
    status, _, doc = exchange(server, method, path, body, headers, token=token, raw=raw)
    return status, doc


def exchange(server: DashboardServer, method: str, path: str, body: Any = None,
             headers: Mapping[str, str] | None = None, *, token: bool = True,
             raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
    """One HTTP request to ``server``; (status, response headers, decoded JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    sent = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    if token and method == "POST":
        sent.setdefault("X-Walsync-Token", server.dashboard.token)
    try:
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        payload = response.read()
    finally:
        conn.close()
    kind = response.getheader("Content-Type") or ""
    doc = json.loads(payload) if "json" in kind else payload.decode()
    return response.status, dict(response.getheaders()), doc


def api(server: DashboardServer, path: str) -> Any:
    status, doc = request(server, "GET", path)
    assert status == 200, (path, status, doc)
    return doc


class Writer:
    """tests/ui/_writer.py in a child process: the store's live writer."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.ui._writer", str(path)],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        try:
            hello = self._read()
        except BaseException:
            self.stop()
            raise
        assert hello.get("ready"), hello
        self.pid = int(hello["pid"])

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the writer process exited with {self.proc.wait()}"
        doc: dict[str, Any] = json.loads(line)
        return doc

    def send(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def writer() -> Iterator[Callable[[Path], Writer]]:
    writers: list[Writer] = []

    def start(path: Path) -> Writer:
        w = Writer(path)
        writers.append(w)
        return w

    yield start
    for w in writers:
        w.stop()
