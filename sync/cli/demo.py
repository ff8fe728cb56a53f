"""`walsync demo`, the README's main job: a small invoicing pipeline that survives being killed.

fetch orders (paged, with a resume cursor) → compute invoices → summarise
with a paid model API (tokens and dollars) → charge cards (not idempotent) →
email receipts (not idempotent). ``crash_after=N`` makes the process SIGKILL
itself part-way through step N + 1, after it has recorded partial progress;
running the demo again resumes the run and shows, step by step, what was
skipped, what ran again and what the resume saved.

Side effects (charges, emails) are appended to ``side-effects.log`` in the
store's directory and fsynced, so a repeated charge would be visible there.

It is an application of the workflow layer, as a user would write one, so it
lives with the command that runs it rather than in the engine.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from walsync.engine import Store
from walsync.engine.workflow import Run, StepStatus, Workflows, current_step

__all__ = ["COMMANDS", "DEMO_STEPS", "run_demo"]

WORKFLOW = "invoices"
DEMO_STEPS = ("fetch_orders", "compute_invoices", "summarise", "charge_cards", "email_receipts")
PAGES = 5
#: what the pretend model API charges per 1,000 tokens, in and out
USD_PER_1K_IN, USD_PER_1K_OUT = 0.003, 0.015


@dataclass
class _Outcome:
    step_id: str
    action: str  # "ran", "resumed", "skipped", "recovered"
    detail: str
    usd: float
    seconds: float


class _Demo:
    def __init__(self, store: Store, out: Callable[[str], None], crash_after: int | None,
                 delay_seconds: float) -> None:
        self.store = store
        self.out = out
        self.crash_after = crash_after
        self.delay = delay_seconds
        self.ledger = Path(store.path) / "side-effects.log"
        self.resolved: set[str] = set()

    # -- the pipeline's steps ---------------------------------------------------

    def fetch_orders(self) -> list[dict[str, Any]]:
        ctx = current_step()
        orders: list[dict[str, Any]] = list(ctx.cursor["orders"]) if ctx.cursor else []
        first_page = ctx.cursor["next_page"] if ctx.cursor else 1
        for page in range(first_page, PAGES + 1):
            time.sleep(self.delay)
            orders += [{"order": f"A-{page}{i:02d}", "customer": f"cust-{(page * 7 + i) % 9}",
                        "cents": 1000 + page * 137 + i * 59} for i in range(4)]
            ctx.progress(page / PAGES, cursor={"next_page": page + 1, "orders": orders})
            self._maybe_crash_inside("fetch_orders", page)
        return orders

    def compute_invoices(self, orders: list[dict[str, Any]]) -> dict[str, int]:
        time.sleep(self.delay)
        totals: dict[str, int] = {}
        for o in orders:
            totals[o["customer"]] = totals.get(o["customer"], 0) + o["cents"]
        self._maybe_crash_inside("compute_invoices", 2)
        return dict(sorted(totals.items()))

    def summarise(self, invoices: dict[str, int]) -> str:
        time.sleep(self.delay * 2)
        tokens_in, tokens_out = 1200 + 40 * len(invoices), 380
        current_step().add_cost(
            tokens_in=tokens_in, tokens_out=tokens_out,
            usd=tokens_in / 1000 * USD_PER_1K_IN + tokens_out / 1000 * USD_PER_1K_OUT,
        )
        self._maybe_crash_inside("summarise", 2)
        biggest = max(invoices, key=lambda c: invoices[c])
        return f"{len(invoices)} invoices, {sum(invoices.values()) / 100:.2f} USD in all; " \
               f"largest: {biggest}"

    def charge_cards(self, invoices: dict[str, int]) -> list[str]:
        # Like a payment API's idempotency key: a customer the log shows as
        # charged is not charged again when an interrupted step is retried.
        charged = _already_charged(self.ledger)
        receipts = []
        for n, (customer, cents) in enumerate(invoices.items(), 1):
            time.sleep(self.delay / 2)
            if customer not in charged:
                self._side_effect(f"charge {customer} {cents}")
            receipts.append(f"rcpt-{customer}-{cents}")
            current_step().progress(n / len(invoices), cursor=n)
            self._maybe_crash_inside("charge_cards", n)
        return receipts

    def email_receipts(self, receipts: list[str]) -> int:
        # Same idempotency check as charge_cards: a receipt the log shows as
        # sent is not sent again when an interrupted step is retried.
        sent = _logged(self.ledger, "email")
        time.sleep(self.delay)
        for n, r in enumerate(receipts, 1):
            if r not in sent:
                self._side_effect(f"email {r}")
            self._maybe_crash_inside("email_receipts", n)
        return len(receipts)

    # -- plumbing -----------------------------------------------------------------

    def _side_effect(self, line: str) -> None:
        fd = os.open(self.ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _maybe_crash_inside(self, step_id: str, unit: int) -> None:
        if self.crash_after is None or unit != 2:
            return
        if DEMO_STEPS.index(step_id) == self.crash_after:
            self.out(f"  !! SIGKILL inside {step_id} after recording partial progress "
                     f"(unit {unit}); run `walsync demo` again to resume")
            os.kill(os.getpid(), signal.SIGKILL)

    def drive(self, run: Run) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        before = {s.step_id: s.status for s in run.steps.values()}

        def one(step_id: str, fn: Callable[..., Any], *args: Any, idempotent: bool = True) -> Any:
            started = time.perf_counter()
            usd_before = run.cost.usd
            with run.begin(step_id, idempotent=idempotent) as ctx:
                if not ctx.done:
                    ctx.complete(fn(*args))
            rec = run.steps[step_id]
            if before.get(step_id) == StepStatus.SUCCESS:
                action, detail = "skipped", "recorded output returned"
                usd = float(rec.cost.get("usd", 0.0))
            elif step_id in self.resolved:
                action, detail = "resumed", f"retried after the check (attempt {rec.attempts})"
                usd = run.cost.usd - usd_before
            elif step_id in dict(run.interrupted):
                action, detail = "resumed", f"from its cursor (attempt {rec.attempts})"
                usd = run.cost.usd - usd_before
            else:
                action, detail = "ran", f"attempt {rec.attempts}"
                usd = run.cost.usd - usd_before
            outcomes.append(_Outcome(step_id, action, detail, usd,
                                     time.perf_counter() - started))
            self._report(len(outcomes), outcomes[-1])
            return ctx.output

        orders = one("fetch_orders", self.fetch_orders)
        invoices = one("compute_invoices", self.compute_invoices, orders)
        one("summarise", self.summarise, invoices)
        if not any(c.name == "before-charges" for c in run.checkpoints()):
            run.checkpoint("before-charges", "invoices computed, nobody charged yet",
                           tags=["pre-payment"])
        self._settle_attention(run, "charge_cards", "charge ")
        receipts = one("charge_cards", self.charge_cards, invoices, idempotent=False)
        self._settle_attention(run, "email_receipts", "email ")
        one("email_receipts", self.email_receipts, receipts, idempotent=False)
        return outcomes

    def _settle_attention(self, run: Run, step_id: str, effect: str) -> None:
        """The orchestrator's decision for an interrupted non-idempotent step.

        The demo checks its side-effect log: charges already made are not made
        again; the step is retried for the customers that were not charged.
        """
        rec = run.steps.get(step_id)
        if rec is None or rec.status != StepStatus.NEEDS_ATTENTION:
            return
        done = self.ledger.read_text().count(effect) if self.ledger.exists() else 0
        self.out(f"  ?? {step_id} was interrupted and is not idempotent, so walsync did not "
                 f"re-run it; the orchestrator checks its side-effect log ({done} done) and "
                 "retries the rest")
        run.resolve(step_id, "retry")
        self.resolved.add(step_id)

    def _report(self, n: int, o: _Outcome) -> None:
        marks = {"ran": "ran    ", "resumed": "resumed", "skipped": "skipped"}
        cost = f"${o.usd:.4f}" if o.usd else ""
        self.out(f"  [{n}/{len(DEMO_STEPS)}] {o.step_id:<17} {marks[o.action]}  "
                 f"{o.detail:<42} {o.seconds * 1000:7.1f} ms  {cost}")


def _already_charged(ledger: Path) -> set[str]:
    return _logged(ledger, "charge")


def _logged(ledger: Path, verb: str) -> set[str]:
    """What the side-effect log shows as done for ``verb`` (customers, receipts)."""
    if not ledger.exists():
        return set()
    lines = ledger.read_text().splitlines()
    return {line.split()[1] for line in lines if line.split()[:1] == [verb]}


def run_demo(
    path: str | os.PathLike[str],
    *,
    crash_after: int | None = None,
    delay_seconds: float = 0.15,
    out: Callable[[str], None] = print,
) -> Run:
    """Run (or resume) the demo pipeline in the store at ``path``."""
    if crash_after is not None and not 0 <= crash_after < len(DEMO_STEPS):
        raise ValueError(f"crash_after must be 0..{len(DEMO_STEPS) - 1}, got {crash_after}")
    with Store.open(path) as store:
        wf = Workflows(store)
        resumable = [r for r in wf.resumable() if r.workflow == WORKFLOW]
        if resumable:
            run = wf.get_run(resumable[-1].run_id)
            out(f"walsync demo: resuming run {run.run_id} in {store.path} "
                f"(recovered {store.recovery.replayed_records if store.recovery else 0} "
                "WAL records on open)")
        else:
            run = wf.run(WORKFLOW, total_steps=len(DEMO_STEPS), inputs={"pages": PAGES})
            out(f"walsync demo: new run {run.run_id} in {store.path} (node {store.node_id})")
        demo = _Demo(store, out, crash_after, delay_seconds)
        with run:
            for step_id, action in run.interrupted:
                out(f"  .. {step_id} was running when the last process died: {action}")
            outcomes = demo.drive(run)
        skipped = [o for o in outcomes if o.action == "skipped"]
        saved = sum(o.usd for o in skipped)
        charges = [line for line in demo.ledger.read_text().splitlines()
                   if line.startswith("charge")] if demo.ledger.exists() else []
        out(f"run {run.run_id}: {run.status}, progress {run.record.progress:.0f}%, "
            f"{len(skipped)} step(s) skipped, total cost ${run.cost.usd:.4f}, "
            f"saved by resuming ${saved:.4f}")
        out(f"side effects: {len(charges)} charges for {len(_already_charged(demo.ledger))} "
            f"customers in {demo.ledger} (each customer charged once)")
        return run



@click.command("demo")
@click.option("--store", "-s", "store_path", envvar="WALSYNC_DEMO_STORE", default=".walsync-demo",
              show_default=True, type=click.Path(file_okay=False), help="Demo store directory.")
@click.option("--crash-after", type=click.IntRange(0, len(DEMO_STEPS) - 1),
              help="SIGKILL this process part-way through step N+1 (0-based N).")
@click.option("--delay", type=click.FloatRange(min=0), default=0.15, show_default=True,
              help="Seconds each unit of pretend work takes.")
@click.option("--fresh", is_flag=True, help="Delete the demo store first.")
def demo_command(store_path: str, crash_after: int | None, delay: float, fresh: bool) -> None:
    """Run an invoicing pipeline that survives SIGKILL; run again to resume it.

    Try: walsync demo --crash-after 3; walsync demo
    """
    if fresh and os.path.isdir(store_path):
        shutil.rmtree(store_path)
    run_demo(store_path, crash_after=crash_after, delay_seconds=delay, out=click.echo)


COMMANDS = [demo_command]
