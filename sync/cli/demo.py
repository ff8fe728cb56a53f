"""`walsync demo`, the README's main job: a small invoicing pipeline that survives being killed.

fetch orders (paged, with a resume cursor) → compute invoices → summarise
with a paid model API (tokens and dollars) → charge cards (not idempotent) →
email receipts (not idempotent). ``crash_after=N`` makes the process SIGKILL
itself part-way through step N + 1, after it has recorded partial progress;
running the demo again resumes the run and shows, step by step, what was
skipped, what ran again and what the resume saved.

Side effects (charges, emails) are appended to ``side-effects.log`` in the
store's directory and fsynced, so a repeated charge would be visible there.

What it prints is for a person (colour on a terminal only) or, with ``--json``,
one object a line. A reader that goes away (``walsync demo | head -2``) stops
the printing, not the run: the run is the point, its output a courtesy.

It is an application of the workflow layer, as a user would write one, so it
lives with the command that runs it rather than in the engine.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from walsync.engine import Store
from walsync.engine.workflow import Run, RunStatus, StepStatus, Workflows, current_step

from .output import Output, json_option

__all__ = ["COMMANDS", "DEMO_STEPS", "PAGES", "WORKFLOW", "run_demo"]

WORKFLOW = "invoices"
DEMO_STEPS = ("fetch_orders", "compute_invoices", "summarise", "charge_cards", "email_receipts")
PAGES = 5
#: what the pretend model API charges per 1,000 tokens, in and out
USD_PER_1K_IN, USD_PER_1K_OUT = 0.003, 0.015


@dataclass
class _Outcome:
    step_id: str
    action: str  # "ran", "resumed", "skipped"
    detail: str
    usd: float
    seconds: float


#: how each action reads on a terminal
_COLOURS = {"ran": "yellow", "resumed": "cyan", "skipped": "green"}


class _Demo:
    def __init__(self, store: Store, out: Callable[[str], None], crash_after: int | None,
                 delay_seconds: float, emit: Callable[[dict[str, Any]], None] | None) -> None:
        self.store = store
        self.out = out
        self.emit = emit
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
            if self.emit is not None:
                self.emit({"event": "sigkill", "step": step_id, "unit": unit})
            self.out(click.style(f"  !! SIGKILL inside {step_id} after recording partial "
                                 f"progress (unit {unit}); run `walsync demo` again to resume",
                                 fg="red", bold=True))
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def drive(self, run: Run) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        before = {s.step_id: s.status for s in run.steps.values()}
        interrupted_cursor = {s.step_id: s.cursor for s in run.steps.values()}

        def one(step_id: str, fn: Callable[..., Any], *args: Any, idempotent: bool = True) -> Any:
            started = time.perf_counter()
            usd_before = run.cost.usd
            with run.begin(step_id, idempotent=idempotent) as ctx:
                if not ctx.done:
                    ctx.complete(fn(*args))
            rec = run.steps[step_id]
            was = before.get(step_id)
            if was == StepStatus.SUCCESS:
                action, detail = "skipped", "recorded output returned"
                usd = float(rec.cost.get("usd", 0.0))
            elif step_id in self.resolved:
                action, detail = "resumed", f"retried after the check (attempt {rec.attempts})"
                usd = run.cost.usd - usd_before
            elif step_id in dict(run.interrupted):
                action, detail = "resumed", f"from its cursor (attempt {rec.attempts})"
                usd = run.cost.usd - usd_before
            elif was in (StepStatus.CANCELLED, StepStatus.FAILURE):
                # stopped by Ctrl-C (cancelled) or an error: the run goes on from it
                how = "from its cursor" if interrupted_cursor.get(step_id) is not None \
                    else "again"
                action, detail = "resumed", f"{how} after {was} (attempt {rec.attempts})"
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
        if self.emit is not None:
            self.emit({"event": "needs_attention", "step": step_id, "done": done})
        self.out(click.style(f"  ?? {step_id} was interrupted and is not idempotent, so walsync "
                             "did not re-run it; the orchestrator checks its side-effect log "
                             f"({done} done) and retries the rest", fg="magenta"))
        run.resolve(step_id, "retry")
        self.resolved.add(step_id)

    def _report(self, n: int, o: _Outcome) -> None:
        if self.emit is not None:
            self.emit({"event": "step", "n": n, **asdict(o)})
        mark = click.style(f"{o.action:<7}", fg=_COLOURS[o.action], bold=True)
        cost = f"${o.usd:.4f}" if o.usd else ""
        self.out(f"  [{n}/{len(DEMO_STEPS)}] {o.step_id:<17} {mark}  "
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
    emit: Callable[[dict[str, Any]], None] | None = None,
) -> Run:
    """Run (or resume) the demo pipeline in the store at ``path``; ``out`` gets the lines
    for people, ``emit`` (when given) each event as an object."""
    if crash_after is not None and not 0 <= crash_after < len(DEMO_STEPS):
        raise ValueError(f"crash_after must be 0..{len(DEMO_STEPS) - 1}, got {crash_after}")
    with Store.open(path) as store:
        wf = Workflows(store)
        ledger = Path(store.path) / "side-effects.log"
        resumable = [r for r in wf.resumable() if r.workflow == WORKFLOW]
        finished = [r for r in wf.list_runs(workflow=WORKFLOW)
                    if r.status == RunStatus.COMPLETED]
        if resumable:
            run = wf.get_run(resumable[-1].run_id)
            replayed = store.recovery.replayed_records if store.recovery else 0
            on_open = (f"replayed {replayed} WAL record{'' if replayed == 1 else 's'} into "
                       "the snapshot on open"
                       if replayed else "every commit was already in the snapshot: nothing "
                       "to replay")
            if emit is not None:
                emit({"event": "resuming", "run_id": run.run_id, "path": store.path,
                      "replayed_records": replayed})
            out(f"walsync demo: resuming run {run.run_id} in {store.path}, "
                f"{run.record.steps_done} of {len(DEMO_STEPS)} steps done ({on_open})")
        elif finished:
            # nothing to resume: a new run would find every customer charged already
            run = wf.get_run(finished[-1].run_id)
            charged = _logged(ledger, "charge")
            if emit is not None:
                emit({"event": "completed_before", "run_id": run.run_id, "path": store.path,
                      "cost_usd": run.cost.usd, "customers_charged": len(charged)})
            out(f"walsync demo: run {run.run_id} in {store.path} already completed "
                f"(total cost ${run.cost.usd:.4f}, {len(charged)} customers charged); "
                "`walsync demo --fresh` starts a new one")
            return run
        else:
            run = wf.run(WORKFLOW, total_steps=len(DEMO_STEPS), inputs={"pages": PAGES})
            if emit is not None:
                emit({"event": "new_run", "run_id": run.run_id, "path": store.path,
                      "node_id": store.node_id})
            out(f"walsync demo: new run {run.run_id} in {store.path} (node {store.node_id})")
        demo = _Demo(store, out, crash_after, delay_seconds, emit)
        with run:
            for step_id, action in run.interrupted:
                if emit is not None:
                    emit({"event": "interrupted", "step": step_id, "action": action})
                out(f"  .. {step_id} was running when the last process died: {action}")
            outcomes = demo.drive(run)
        skipped = [o for o in outcomes if o.action == "skipped"]
        saved = sum(o.usd for o in skipped)
        charges = [line for line in demo.ledger.read_text().splitlines()
                   if line.startswith("charge")] if demo.ledger.exists() else []
        customers = _already_charged(demo.ledger)
        if emit is not None:
            emit({"event": "finished", "run_id": run.run_id, "status": str(run.status),
                  "progress": run.record.progress, "skipped_steps": len(skipped),
                  "cost_usd": run.cost.usd, "saved_usd": saved, "charges": len(charges),
                  "customers_charged": len(customers), "side_effects": str(demo.ledger)})
        out(click.style(f"run {run.run_id}: {run.status}", fg="green", bold=True)
            + f", progress {run.record.progress:.0f}%, {len(skipped)} step(s) skipped, "
              f"total cost ${run.cost.usd:.4f}, saved by resuming ${saved:.4f}")
        once = "each customer charged once" if len(charges) == len(customers) else \
            click.style("SOME CUSTOMER CHARGED TWICE", fg="red", bold=True)
        out(f"side effects: {len(charges)} charges for {len(customers)} customers in "
            f"{demo.ledger} ({once})")
        return run


class _Printer:
    """Lines to stdout until the reader goes away (``| head``): then nothing more is
    printed and the run goes on, so a closed pipe never fails the run."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.closed = False

    def line(self, text: str) -> None:
        if not self.out.json:
            self._write(lambda: click.echo(text))

    def event(self, data: dict[str, Any]) -> None:
        self._write(lambda: self.out.result(data, lambda: ""))

    def _write(self, write: Callable[[], None]) -> None:
        if self.closed:
            return
        try:
            write()
            sys.stdout.flush()
        except BrokenPipeError:
            self.closed = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # the interpreter's flush at exit too
            os.close(devnull)


@click.command("demo")
@click.option("--store", "-s", "store_path", envvar="WALSYNC_DEMO_STORE", default=".walsync-demo",
              show_default=True, type=click.Path(file_okay=False), help="Demo store directory.")
@click.option("--crash-after", type=click.IntRange(0, len(DEMO_STEPS) - 1), metavar="N",
              help="SIGKILL this process in the middle of step N, after it recorded partial "
                   "progress: " + ", ".join(f"{n} {name}" for n, name in enumerate(DEMO_STEPS))
                   + ".")
@click.option("--delay", type=click.FloatRange(min=0), default=0.15, show_default=True,
              help="Seconds each unit of pretend work takes.")
@click.option("--fresh", is_flag=True, help="Delete the demo store first and start a new run.")
@json_option
def demo_command(store_path: str, crash_after: int | None, delay: float, fresh: bool,
                 out: Output) -> None:
    """Run an invoicing pipeline that survives SIGKILL; run again to resume it.

    Try: walsync demo --fresh --crash-after 3; walsync demo. Ctrl-C stops it
    (exit 130); the next run resumes the interrupted step. With --json: one
    object a line, an event each (new_run or resuming, step, finished, ...).
    """
    if fresh and os.path.isdir(store_path):
        shutil.rmtree(store_path)
    printer = _Printer(out)
    try:
        run_demo(store_path, crash_after=crash_after, delay_seconds=delay, out=printer.line,
                 emit=printer.event if out.json else None)
    except KeyboardInterrupt:
        click.echo("stopped; `walsync demo` resumes the run", err=True)
        raise


COMMANDS = [demo_command]
