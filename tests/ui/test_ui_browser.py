"""The dashboard in a real browser: headless Chromium against `walsync ui` serving demo stores.

The dashboard runs as the real command (`walsync ui --port 0`) in a child
process. Most checks read the DOM Chromium dumps once the page's script has
fetched and drawn (``--dump-dom``); the last drives a live tab over the
DevTools protocol: a commit by another process appears without a reload, and
an action goes through its confirmation dialog. Without Chromium these tests
fail with the command that installs it.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.ui.browser import INSTALL_HINT, Element, Page, dump_dom, find_chromium, parse
from tests.ui.conftest import DemoStore, Writer
from tests.ui.stores import CONFLICT_KEY, ROOT, SHOWCASE


@pytest.fixture(scope="module")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return found


def _fmt_usd(usd: float) -> str:
    """The page's money format (app.js fmtUsd)."""
    if not usd:
        return "$0"
    return f"${usd:.4f}" if usd < 1 else f"${usd:,.2f}"


class _Served:
    """`walsync ui` in a child process; ``url`` is what it printed."""

    def __init__(self, store: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from walsync.sync.cli import main; main()", "ui", "--store",
             str(store), "--port", "0", *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        found = re.search(r"on (http://127\.0\.0\.1:\d+/) ", line)
        if not found:
            self.stop()
            raise AssertionError(f"walsync ui printed {line!r}")
        self.url = found.group(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(scope="module")
def demo_ui(demo_store: DemoStore) -> Iterator[str]:
    served = _Served(demo_store.path)
    yield served.url
    served.stop()


@pytest.fixture(scope="module")
def showcase_ui(showcase_store: DemoStore) -> Iterator[str]:
    served = _Served(showcase_store.path)
    yield served.url
    served.stop()


def _text(el: Element) -> str:
    return " ".join(el.text().split())


def test_browser_runs_list_shows_the_demo_run_status_and_cost(
        chromium: str, demo_ui: str, demo_store: DemoStore) -> None:
    page = parse(dump_dom(chromium, demo_ui + "#/runs"))
    row = page.find("tr", data_run=demo_store.run_id)
    assert row.find("span", cls="pill").attrs["data-status"] == "completed"
    assert "invoices" in _text(row)
    assert "5/5" in _text(row)
    assert _fmt_usd(demo_store.run_cost.usd) in _text(row.find("td", cls="r"))
    assert demo_store.run_cost.usd > 0
    assert page.find(id="live").attrs["data-state"] == "live"
    assert _text(page.find(id="mode")) == "read-only"
    assert "1 of 1 runs" in _text(page.find("main"))


def test_browser_run_page_shows_the_crashed_and_resumed_step_and_costs(
        chromium: str, demo_ui: str, demo_store: DemoStore) -> None:
    page = parse(dump_dom(chromium, f"{demo_ui}#/runs/{demo_store.run_id}"))
    timeline = page.find(id="timeline")
    rows = timeline.find_all(cls="tl-row")
    assert [r.attrs["data-step"] for r in rows] == demo_store.steps
    charge = timeline.find(cls="tl-row", data_step="charge_cards")
    assert "resumed after crash" in _text(charge.find(cls="tag"))
    assert charge.find_all(cls="mark"), "the crash is marked on the timeline"
    assert charge.find_all(cls="earlier"), "the interrupted attempt is drawn before the retry"
    assert _text(charge.find(cls="att")) == "\u00d72"  # the multiplication sign
    for row in rows:
        if row.attrs["data-step"] != "charge_cards":
            assert _text(row.find(cls="att")) == "\u00d71"
            assert not row.find_all(cls="mark")
    for sid, cost in demo_store.step_costs.items():
        shown = _text(timeline.find(cls="tl-row", data_step=sid).find(cls="step-cost"))
        assert shown == (_fmt_usd(cost.usd) if cost else "—"), sid
    assert _text(page.find(id="run-total-cost")) == _fmt_usd(demo_store.run_cost.usd)
    cost_card = _text(page.find(cls="stat", data_stat="run-cost"))
    assert _fmt_usd(demo_store.run_cost.usd) in cost_card
    assert f"{demo_store.run_cost.tokens_in:,} in" in cost_card
    assert "before-charges" in _text(timeline.find(cls="flag-label"))
    steps = page.find(cls="steps")
    assert [s.attrs["data-step"] for s in steps.find_all(cls="step")] == demo_store.steps
    charge_item = _text(steps.find(cls="step", data_step="charge_cards"))
    assert "2 attempts" in charge_item
    assert "not idempotent" in charge_item
    assert "1 step interrupted by a crash" in _text(page.find(cls="stats"))


def test_browser_shows_attention_failures_and_conflicts_read_only(
        chromium: str, showcase_ui: str) -> None:
    attention = parse(dump_dom(chromium, f"{showcase_ui}#/runs/{SHOWCASE['attention']}"))
    banner = attention.find(cls="banner", data_attention="send_reply")
    assert "needs attention" in _text(banner)
    assert not banner.find_all("button"), "a read-only dashboard offers no action"
    assert "walsync ui --allow-actions" in _text(banner)
    row = attention.find(cls="tl-row", data_step="send_reply")
    assert row.attrs["data-status"] == "needs_attention"
    assert {"crashed", "needs attention"} <= {_text(t) for t in row.find_all(cls="tag")}

    failed = parse(dump_dom(chromium, f"{showcase_ui}#/runs/{SHOWCASE['failed']}"))
    row = failed.find(cls="tl-row", data_step="charge_cards")
    assert row.attrs["data-status"] == "failure"
    assert "failed" in _text(row)
    assert "CardDeclinedError" in _text(failed.find(cls="banner"))
    assert "insufficient funds" in _text(failed.find(cls="step", data_step="charge_cards"))

    replication = parse(dump_dom(chromium, f"{showcase_ui}#/replication"))
    assert "Sync is not configured" in _text(replication.find(id="sync-off"))
    conflict = replication.find(cls="conflict", data_key=CONFLICT_KEY)
    values = [json.loads(_text(s.find("pre"))) for s in conflict.find_all(cls="sibling")]
    assert sorted(v["usd_per_seat"] for v in values) == [12, 14]
    assert not conflict.find_all("button")


def test_browser_refreshes_in_place_and_confirms_an_action(
        chromium: str, showcase_store: DemoStore, store_copy: Callable[[Path], Path],
        writer: Callable[[Path], Writer]) -> None:
    path = store_copy(showcase_store.path)
    served = _Served(path, "--allow-actions")
    try:
        with Page(chromium) as page:
            page.goto(served.url + "#/runs")
            page.wait_for(f"!!document.querySelector('tr[data-run=\"{SHOWCASE['etl']}\"]')",
                          what="the runs list")
            assert page.evaluate("document.getElementById('mode').textContent") \
                == "actions enabled"
            page.evaluate("window.__sameDocument = true")
            live = writer(path)  # another process commits a new run while the page is open
            live.send("run late-browser")
            page.wait_for("!!document.querySelector('tr[data-run=\"late-browser\"]')",
                          what="the new run, without a reload")
            assert page.evaluate("window.__sameDocument") is True
            live.stop()  # the action below needs the writer lock

            page.evaluate(f"location.hash = '#/runs/{SHOWCASE['attention']}'")
            page.wait_for("!!document.querySelector('[data-attention=\"send_reply\"] button')",
                          what="the needs-attention banner")
            page.click("[data-attention='send_reply'] button")  # Retry
            title = page.wait_for("document.getElementById('confirm').open && "
                                  "document.getElementById('confirm-title').textContent")
            assert title == "Retry: send_reply"
            assert "not idempotent" in page.evaluate(
                "document.getElementById('confirm-text').textContent")
            page.click("#confirm-cancel")
            assert page.evaluate("document.getElementById('confirm').open") is False
            assert page.evaluate("!!document.querySelector('[data-attention]')")

            page.click("[data-attention='send_reply'] button")
            page.wait_for("document.getElementById('confirm').open")
            page.click("#confirm-ok")
            page.wait_for("!document.querySelector('[data-attention]') && "
                          "document.querySelector('.step[data-step=\"send_reply\"] .pill')"
                          ".dataset.status === 'pending'", what="the resolved step")
            assert page.evaluate("document.getElementById('confirm').open") is False
            assert "send_reply: pending" in page.evaluate(
                "document.getElementById('toast').textContent")
            assert page.evaluate("window.__sameDocument") is True

            away = path.with_name("moved")  # the store goes away while the page is open
            path.rename(away)
            page.evaluate("location.hash = '#/store'")
            message = page.wait_for("document.getElementById('load-error') && "
                                    "document.getElementById('load-error').textContent",
                                    what="the error in place of the store's health")
            assert "no walsync store" in message
            assert page.evaluate("document.getElementById('live').dataset.state") == "error"
            away.rename(path)
            page.wait_for("!!document.querySelector('[data-stat=\"applied\"]')",
                          what="the store's health once it is back")
            assert page.evaluate("document.getElementById('live').dataset.state") == "live"
            errors = [e for e in page.events if e.get("method") == "Runtime.exceptionThrown"]
            assert errors == [], errors
    finally:
        served.stop()
