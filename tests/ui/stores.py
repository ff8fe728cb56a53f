"""Stores the dashboard is tested and pictured on.

``make_demo_store``: the README's main job, killed by SIGKILL inside
``charge_cards`` and resumed, exactly as ``walsync demo --crash-after 3;
walsync demo`` leaves it (the real console command, in child processes).

``add_showcase_runs``: runs in the other states a dashboard must draw — a run
paused on a ``needs_attention`` step, a failed one, one still running, one
rolled back to a named checkpoint, one with an output stored under its own key
— and a key with two concurrent versions (a conflict).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cbor2

from walsync.engine import Store
from walsync.engine.errors import StepNeedsAttentionError
from walsync.engine.record import CODEC_NONE
from walsync.engine.versions import Sibling, Version
from walsync.engine.workflow import Workflows

ROOT = Path(__file__).resolve().parents[2]
CONFLICT_KEY = "config/pricing"


def walsync(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The `walsync` command, run as a child process from the repository's root."""
    done = subprocess.run([sys.executable, "-m", "walsync.sync.cli", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"walsync {' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stdout}\n{done.stderr}")
    return done


def make_demo_store(path: Path, delay_seconds: float = 0.02) -> str:
    """The demo's store after a crash inside charge_cards and a resume; returns the run id."""
    crashed = walsync("demo", "--fresh", "--crash-after", "3", "--store", str(path),
                      "--delay", str(delay_seconds), check=False)
    assert crashed.returncode == -signal.SIGKILL, (crashed.returncode, crashed.stdout,
                                                   crashed.stderr)
    resumed = walsync("demo", "--store", str(path), "--delay", str(delay_seconds))
    assert "charge_cards" in resumed.stdout, resumed.stdout
    assert "resumed" in resumed.stdout, resumed.stdout
    with Store.open(path, readonly=True) as store:
        (run,) = Workflows(store).list_runs()
        return run.run_id


def _work(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


SHOWCASE = {"etl": "etl-2026-12-06", "rolled_back": "weekly-report-49",
            "attention": "ticket-4821", "failed": "invoices-2026-12-05",
            "running": "embed-catalog"}


def make_showcase_store(path: Path, pause_seconds: float = 0.05,
                        demo_delay_seconds: float = 0.02) -> str:
    """The demo's store plus ``add_showcase_runs``; returns the demo run's id."""
    run_id = make_demo_store(path, demo_delay_seconds)
    add_showcase_runs_in_child(path, pause_seconds)
    return run_id


def add_showcase_runs_in_child(path: Path, pause_seconds: float = 0.05) -> None:
    """``add_showcase_runs`` in a process of its own: steps it leaves running stay so, as
    a crashed or live worker leaves them, and no step context leaks into the caller."""
    done = subprocess.run([sys.executable, "-m", "tests.ui.stores", str(path), str(pause_seconds)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def add_showcase_runs(path: Path, pause_seconds: float = 0.05) -> dict[str, str]:
    """Add runs in every state the dashboard draws; returns their ids by role (SHOWCASE)."""
    p = pause_seconds
    with Store.open(path) as store:
        wf = Workflows(store)

        etl = wf.run("nightly-etl", run_id="etl-2026-12-06", total_steps=3,
                     inputs={"day": "2026-12-06", "tables": ["orders", "refunds"]})
        with etl:
            rows = etl.step("extract", _work, p,
                            [{"row": i, "sku": f"SKU-{i:05d}", "qty": i % 7} for i in range(900)])
            with etl.begin("transform") as s:
                if not s.done:
                    time.sleep(p)
                    s.add_cost(tokens_in=5200, tokens_out=900, usd=0.0291, gpu_seconds=3.5)
                    s.complete({"rows": len(rows), "rejected": 3})
            etl.step("load", _work, p * 2, {"loaded": len(rows)})

        report = wf.run("report-builder", run_id="weekly-report-49", total_steps=3)
        with report:
            with report.begin("draft") as s:
                if not s.done:
                    time.sleep(p)
                    s.add_cost(tokens_in=8100, tokens_out=2300, usd=0.0588)
                    s.complete("Week 49: revenue up 4%, refunds flat.")
            report.checkpoint("draft-ready", "first draft written, not yet reviewed",
                              tags=["review"])
            report.step("polish", _work, p, "Week 49: revenue rose 4%; refunds were flat.")
        report.rollback("draft-ready")

        agent = wf.run("support-agent", run_id="ticket-4821", total_steps=3,
                       inputs={"ticket": 4821, "channel": "email"})
        agent.start()
        agent.step("classify", _work, p, {"intent": "refund", "confidence": 0.93})
        interrupted = agent.begin("send_reply", idempotent=False)
        interrupted.__enter__()  # the process "dies" here: the step stays running
        time.sleep(p)
        resumed = Workflows(store).get_run("ticket-4821")
        try:
            with resumed:
                resumed.step("classify", _work, p, None)
                resumed.step("send_reply", _work, p, "sent", idempotent=False)
        except StepNeedsAttentionError:
            pass

        failed = wf.run("invoices", run_id="invoices-2026-12-05", total_steps=5)
        try:
            with failed:
                failed.step("fetch_orders", _work, p, [{"order": "A-100"}])
                failed.step("charge_cards", _declined)
        except RuntimeError:
            pass

        running = wf.run("embeddings", run_id="embed-catalog", total_steps=4)
        running.start()
        running.step("chunk", _work, p, {"chunks": 1240})
        embed = running.begin("embed")
        embed.__enter__()  # a live worker between two progress reports
        embed.add_cost(tokens_in=410_000, usd=0.0082)
        embed.progress(0.45, cursor={"chunk": 558})

        store.put(CONFLICT_KEY, {"plan": "pro", "usd_per_seat": 12})
        store.apply_remote([(CONFLICT_KEY, Sibling(
            Version("node-berlin-2", 7, (int(time.time() * 1000) << 16), {"node-berlin-2": 7}),
            CODEC_NONE, cbor2.dumps({"plan": "pro", "usd_per_seat": 14})))])
    return SHOWCASE


class CardDeclinedError(RuntimeError):
    pass


def _declined() -> None:
    time.sleep(0.01)
    raise CardDeclinedError("card ending 4242 declined: insufficient funds")


if __name__ == "__main__":
    add_showcase_runs(Path(sys.argv[1]), float(sys.argv[2]))
