"""What `walsync` prints for people, in a real terminal and through a pipe: colour and
progress bars on a terminal only, tables in human units, and the demo's wording.

Terminal runs go through a pseudo-terminal (tests/terminal.py); pipe runs through
subprocess pipes, as a script or a log collector reads them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.terminal import ANSI, WALSYNC, in_terminal, plain
from walsync.engine import Store
from walsync.engine.workflow import RunStatus, Workflows

#: the environment without any sync server or store setting of the caller's
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("WALSYNC_", "SUPABASE_"))}


def piped(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(WALSYNC), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout, check=False)


def many_keys(path: Path, keys: int) -> None:
    with Store.open(path, durability="none", node_id="big") as store:
        for start in range(0, keys, 10_000):
            with store.batch() as batch:
                for i in range(start, min(keys, start + 10_000)):
                    batch.put(f"k/{i:07d}", {"n": i, "pad": "x" * 100})


# -- progress ------------------------------------------------------------------------


@pytest.mark.slow
def test_progress_bar_on_a_terminal_for_long_work_and_none_on_a_pipe(tmp_path: Path) -> None:
    many_keys(tmp_path / "s", 150_000)
    code, shown = in_terminal(["export", "-s", "s", "all.wsx"], cwd=tmp_path)
    assert code == 0, shown
    assert "exporting keys" in shown  # the bar's label ...
    assert re.search(r"\d[\d,]*/150,000", shown), shown  # ... its count of keys
    assert "━" in shown  # ... and the bar itself
    assert "exported 150000 keys" in plain(shown)

    result = piped("export", "-s", "s", "again.wsx", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # a pipe gets no bar, not even its label
    assert ANSI.search(result.stdout) is None


def test_quick_work_shows_no_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    """Under a second, a bar would only flicker: none is drawn."""
    many_keys(tmp_path / "s", 10)
    code, shown = in_terminal(["verify", "-s", "s"], cwd=tmp_path)
    assert code == 0, shown
    assert "verifying" not in shown
    assert plain(shown).startswith("ok: ")


# -- status --------------------------------------------------------------------------


def test_status_is_a_table_in_colour_on_a_terminal_and_plain_on_a_pipe(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", node_id="n-1") as store:
        store.put("k", 1)
        store.put("k2", "x" * 5000)
    code, shown = in_terminal(["status", "-s", "s"], cwd=tmp_path)
    assert code == 6, shown  # no server configured: a health check fails
    assert "\x1b[" in shown  # the verdict in colour
    text = plain(shown)
    rows = {line[:19].strip(): line[19:].strip() for line in text.splitlines() if line.strip()}
    assert rows["health"] == "UNREACHABLE"
    assert rows["store"] == "n-1 at LSN 2"
    assert rows["server"] == "<not configured>"
    assert rows["server error"].startswith("no sync server configured")
    assert re.fullmatch(r"2 entries, the oldest written [\d.]+ s ago", rows["not on the server"])
    for raw in ("None", "[]", "{", "unix_ms"):
        assert raw not in text

    result = piped("status", "-s", "s", cwd=tmp_path)
    assert result.returncode == 6
    assert ANSI.search(result.stdout) is None
    assert [line[:19].strip() for line in result.stdout.splitlines() if line[:1] != " "] == [
        "health", "store", "server", "server error", "hint", "not on the server",
        "acknowledged", "pull cursor", "WAL held for sync"]


# -- the demo --------------------------------------------------------------------------


def test_demo_in_colour_on_a_terminal_and_plain_on_a_pipe(tmp_path: Path) -> None:
    code, shown = in_terminal(["demo", "-s", "d", "--delay", "0"], cwd=tmp_path)
    assert code == 0, shown
    assert "\x1b[" in shown
    assert "each customer charged once" in plain(shown)
    result = piped("demo", "-s", "p", "--delay", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ANSI.search(result.stdout) is None
    assert "each customer charged once" in result.stdout


def test_demo_crash_after_help_names_the_steps(tmp_path: Path) -> None:
    result = piped("demo", "--help", cwd=tmp_path)
    text = " ".join(result.stdout.split())
    assert ("0 fetch_orders, 1 compute_invoices, 2 summarise, 3 charge_cards, "
            "4 email_receipts") in text
    assert "N+1" not in text
    assert "0-based" not in text


def test_demo_resumes_then_says_a_completed_run_is_done(tmp_path: Path) -> None:
    first = piped("demo", "-s", "d", "--fresh", "--crash-after", "2", "--delay", "0",
                  cwd=tmp_path)
    assert first.returncode == -9, first.stdout + first.stderr
    second = piped("demo", "-s", "d", "--delay", "0", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    header = second.stdout.splitlines()[0]
    assert "resuming run" in header
    assert "2 of 5 steps done" in header
    assert "recovered 0" not in header
    assert re.search(r"\(replayed \d+ WAL records? into the snapshot on open\)|"
                     r"\(every commit was already in the snapshot: nothing to replay\)",
                     header), header
    # the killed attempt's model cost counts: both attempts of summarise spent
    assert "total cost $0.0208" in second.stdout, second.stdout

    third = piped("demo", "-s", "d", "--delay", "0", cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert "already completed" in third.stdout
    assert "--fresh" in third.stdout
    assert "charged once" not in third.stdout
    with Store.open(tmp_path / "d", readonly=True) as store:
        assert len(Workflows(store).list_runs(workflow="invoices")) == 1  # no new run


def test_demo_into_head_completes_the_run(tmp_path: Path) -> None:
    """`walsync demo | head -2`: the reader leaves early, the run still completes."""
    result = subprocess.run(f"'{WALSYNC}' demo -s d --delay 0.02 | head -2; "
                            "echo \"exit ${PIPESTATUS[0]}\"", shell=True, executable="bash",
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120,
                            check=False)
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    assert lines[-1] == "exit 0", result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "BrokenPipe" not in result.stderr
    with Store.open(tmp_path / "d", readonly=True) as store:
        [run] = Workflows(store).list_runs(workflow="invoices")
        assert run.status == RunStatus.COMPLETED
        assert run.error is None


def test_demo_json_is_one_object_a_line(tmp_path: Path) -> None:
    result = piped("demo", "-s", "d", "--delay", "0", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events] == ["new_run", *["step"] * 5, "finished"]
    assert [e["step_id"] for e in events[1:-1]] == [
        "fetch_orders", "compute_invoices", "summarise", "charge_cards", "email_receipts"]
    assert events[-1]["status"] == "completed"
    assert events[-1]["charges"] == events[-1]["customers_charged"] == 9
    again = piped("demo", "-s", "d", "--delay", "0", "--json", cwd=tmp_path)
    assert [json.loads(line)["event"] for line in again.stdout.splitlines()] == [
        "completed_before"]


def test_waiting_for_the_writer_lock_shows_on_a_terminal(tmp_path: Path) -> None:
    """Work that cannot count (here: waiting for another writer) still shows it is busy."""
    Store.open(tmp_path / "s").close()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom walsync.engine import Store\n"
         "s = Store.open(sys.argv[1])\nprint('ready', flush=True)\ntime.sleep(3)\n"
         "s.close()", str(tmp_path / "s")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        code, shown = in_terminal(["put", "-s", "s", "k", "1", "--lock-timeout", "60"],
                                  cwd=tmp_path)
    finally:
        holder.wait(timeout=60)
        if holder.stdout is not None:
            holder.stdout.close()
    assert code == 0, shown
    assert "opening s (waiting for the writer lock)" in shown
    assert plain(shown).endswith("committed at LSN 1\n")
