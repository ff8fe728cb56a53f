"""The workflow crash workload: a chained run driven by a child that is killed again and again.

The child (:func:`drive`, forked by the zygote) opens the store and drives run
``crash`` of workflow ``chain``: STEPS chained steps (each output hashes the
previous one; every 10th step is not idempotent), a named checkpoint after
each step ``s..4`` (written once), and once per run, after step
``ROLLBACK_AT``, a rollback to checkpoint ``ROLLBACK_TO``, after which the
steps it discarded run again. A rollback starts a new *epoch* (the run's
rollback count). The child logs its side effects to a ledger file (append
mode, fsync per line, so a line is there before the next thing happens)::

    start <pid> <epoch>            the store is open and the run loaded
    recorded <step> <epoch>        the step was 'success' when the run was loaded
    body <step> <epoch>            the step's body ran (its side effect)
    committed <step> <epoch>       run.step() returned: the success is committed
    resolved <step> <epoch> <retry|succeed>   a needs_attention decision, committed
    checkpoint <name> <epoch>      run.checkpoint() returned
    rollback <name> <epoch>        run.rollback() returned; <epoch> is the new one,
                                   followed by 'recorded' lines of that epoch
    done                           the run completed

and reports on its pipe ``L`` (loaded), ``B <step> <epoch>`` (a body
started), ``C <step> <epoch>`` (a success committed), ``K ...`` (a kill
point), ``D`` (completed). It enters the kill-point phases ``open``,
``start`` (before each ``with run:``), ``begin`` (before a step not yet
done), ``complete`` (in a body: the next commit is the success),
``checkpoint``, ``rollback``, ``resolve`` and ``close``.

:func:`check_side_effects` reads the ledger: a ``body`` line after the same
step's success was acknowledged in the same epoch (recorded, committed or
resolved 'succeed') means a completed step ran again, the one thing resuming
must never do. A non-idempotent step's body runs at most once per epoch: the
child resolves it from the ledger after a kill.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.crash.children import Emitter
from tests.crash.killpoints import KillPlan, KillPoints

CHAIN_WORKFLOW = "chain"
CHAIN_RUN = "crash"
STEPS = 40
ROLLBACK_AT = 27
ROLLBACK_TO = "c014"
STORE_OPTIONS: dict[str, Any] = {"segment_bytes": 8192, "checkpoint_every_bytes": 32768}


def step_id(i: int) -> str:
    return f"s{i:03d}"


def is_idempotent(i: int) -> bool:
    return i % 10 != 9


def checkpoint_after(i: int) -> str | None:
    """The checkpoint written after step ``i``, if any."""
    return f"c{i:03d}" if i % 10 == 4 else None


def chain_output(prev: str, i: int) -> str:
    """The output of step ``i`` given its predecessor's output ("seed" for step 0)."""
    return hashlib.sha256(f"{prev}|{i}".encode()).hexdigest()[:24]


def expected_outputs(n: int = STEPS) -> dict[str, str]:
    out: dict[str, str] = {}
    prev = "seed"
    for i in range(n):
        prev = chain_output(prev, i)
        out[step_id(i)] = prev
    return out


def log_line(ledger: Path, line: str) -> None:
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class WorkflowChildConfig:
    store: str
    ledger: str
    steps: int = STEPS
    body_seconds: float = 0.005
    kill: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _RolledBack(Exception):
    """Leaves ``with run:`` after a rollback, to drive the run again from its start."""


def drive(report_fd: int, args: dict[str, Any]) -> int:
    from walsync.engine import Store
    from walsync.engine.errors import StepNeedsAttentionError
    from walsync.engine.workflow import StepStatus, Workflows

    config = WorkflowChildConfig(**args)
    ledger = Path(config.ledger)
    n = config.steps
    emit = Emitter(report_fd)
    points = KillPoints(emit, KillPlan.from_dict(config.kill))
    points.install()
    points.enter("open")
    with Store.open(config.store, **STORE_OPTIONS) as store:
        run = Workflows(store).run(CHAIN_WORKFLOW, CHAIN_RUN, total_steps=n)
        epoch = run.record.rollbacks

        def recorded() -> list[str]:
            return [f"recorded {rec.step_id} {epoch}" for rec in run.ordered_steps()
                    if rec.status == StepStatus.SUCCESS]

        log_line(ledger, "\n".join([f"start {os.getpid()} {epoch}", *recorded()]))
        emit("L")

        def body(i: int, prev: str) -> str:
            log_line(ledger, f"body {step_id(i)} {epoch}")
            emit(f"B {step_id(i)} {epoch}")
            points.enter("complete")
            time.sleep(config.body_seconds)
            return chain_output(prev, i)

        while True:
            try:
                points.enter("start")
                with run:
                    prev = "seed"
                    for i in range(n):
                        sid = step_id(i)
                        was_done = sid in run.steps and \
                            run.steps[sid].status == StepStatus.SUCCESS
                        if not was_done:
                            points.enter("begin")
                        prev = run.step(sid, body, i, prev, idempotent=is_idempotent(i))
                        if not was_done:
                            log_line(ledger, f"committed {sid} {epoch}")
                            emit(f"C {sid} {epoch}")
                        name = checkpoint_after(i)
                        if name and name not in {c.name for c in run.checkpoints()}:
                            points.enter("checkpoint")
                            run.checkpoint(name, description=f"after {sid}")
                            log_line(ledger, f"checkpoint {name} {epoch}")
                        if i == ROLLBACK_AT and run.record.rollbacks == 0:
                            points.enter("rollback")
                            run.rollback(ROLLBACK_TO)
                            epoch = run.record.rollbacks
                            log_line(ledger, "\n".join([f"rollback {ROLLBACK_TO} {epoch}",
                                                        *recorded()]))
                            raise _RolledBack
            except _RolledBack:
                continue
            except StepNeedsAttentionError as exc:
                # The orchestrator's decision: did the side effect happen in this epoch?
                sid = exc.step_id
                i = int(sid[1:])
                points.enter("resolve")
                if f"body {sid} {epoch}" in ledger.read_text().split("\n"):
                    prev_out = run.output(step_id(i - 1)) if i else "seed"
                    run.resolve(sid, "succeed", chain_output(prev_out, i))
                    log_line(ledger, f"resolved {sid} {epoch} succeed")
                else:
                    run.resolve(sid, "retry")
                    log_line(ledger, f"resolved {sid} {epoch} retry")
                continue
            break
        log_line(ledger, "done")
        points.enter("close")
        completed = run.status == "completed"
    emit("D")
    return 0 if completed else 1


# -- the side-effect ledger's checker ------------------------------------------------


@dataclass
class SideEffects:
    """What a side-effect ledger says, and the rules it breaks."""

    violations: list[str] = field(default_factory=list)
    #: (step, epoch) -> how many times its body ran
    bodies: dict[tuple[str, int], int] = field(default_factory=dict)
    #: (step, epoch) whose success was acknowledged
    acked: set[tuple[str, int]] = field(default_factory=set)
    committed: int = 0
    checkpoints: set[str] = field(default_factory=set)
    #: the highest epoch an acknowledged rollback started
    epoch: int = 0
    starts: int = 0
    done: bool = False

    def ran(self, sid: str) -> bool:
        return any(s == sid for s, _ in self.bodies)


def check_side_effects(lines: list[str]) -> SideEffects:
    """Read a ledger file's lines (see the module doc for the rules)."""
    out = SideEffects()
    acked_at: dict[tuple[str, int], str] = {}
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        word, *rest = line.split(" ")
        where = f"line {n}: {line}"
        if word == "done":
            out.done = True
            continue
        if len(rest) < 2:
            out.violations.append(f"{where}: unparsable")
            continue
        name, epoch = rest[0], int(rest[1])
        if word in ("start", "recorded") and epoch < out.epoch:
            out.violations.append(f"{where}: epoch {epoch} after the acknowledged rollback "
                                  f"to epoch {out.epoch}: the rollback was lost")
        if word == "start":
            out.starts += 1
            out.epoch = max(out.epoch, epoch)  # a rollback committed, its line not written
        elif word in ("recorded", "committed") or (word == "resolved" and rest[2:] ==
                                                     ["succeed"]):
            acked_at.setdefault((name, epoch), where)
            out.acked.add((name, epoch))
            out.committed += word != "recorded"
        elif word == "body":
            key = (name, epoch)
            out.bodies[key] = out.bodies.get(key, 0) + 1
            if key in acked_at:
                out.violations.append(f"{where}: the body of {name} ran after its success "
                                      f"was acknowledged ({acked_at[key]})")
            elif out.bodies[key] > 1 and not is_idempotent(int(name[1:])):
                out.violations.append(f"{where}: the non-idempotent {name} ran "
                                      f"{out.bodies[key]} times in epoch {epoch}")
        elif word == "checkpoint":
            out.checkpoints.add(name)
            out.committed += 1
        elif word == "rollback":
            out.epoch = max(out.epoch, epoch)
            out.committed += 1
        elif word != "resolved":
            out.violations.append(f"{where}: unknown line")
    return out
