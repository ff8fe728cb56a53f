"""Child processes for the workflow suites, killed with SIGKILL by the parent.

    python tests/workflow/_child.py midstep STORE IDEMPOTENT(0|1)
        drives run "r" of workflow "w": step "prep", then step "work", whose
        body records progress (0.5, cursor {"rows": 5}), prints MID and
        sleeps until it is killed.

    python tests/workflow/_child.py drive STORE LEDGER STEPS
        drives run "crash" of workflow "chain" with STEPS chained steps (every
        10th one not idempotent), logging to LEDGER (append mode, fsync per
        line):

            start <pid>          the process opened the store
            recorded <step_id>   the step was 'success' when the run was loaded
            body <step_id>       the step's body ran (its side effect)
            committed <step_id>  run.step() returned: the success is committed
                                 (only for steps that were not 'success' before)
            resolved <step_id> <retry|succeed>   a needs_attention decision
            done                 the run completed

        It prints LOADED once imported, waits for "go" on stdin (so the parent
        can start it while the previous child still runs), prints "B <step_id>"
        after a body line and "C <step_id>" after a committed line (the parent
        times kills by them), and exits 0 when the run is completed.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

from engine import Store
from engine.errors import StepNeedsAttentionError
from engine.runs import StepStatus
from engine.workflow import Workflows, current_step

CHAIN_WORKFLOW = "chain"
CHAIN_RUN = "crash"
BODY_SECONDS = 0.008


def step_id(i: int) -> str:
    return f"s{i:03d}"


def is_idempotent(i: int) -> bool:
    return i % 10 != 9


def chain_output(prev: str, i: int) -> str:
    """The output of step ``i`` given its predecessor's output ("seed" for step 0)."""
    return hashlib.sha256(f"{prev}|{i}".encode()).hexdigest()[:24]


def expected_outputs(n: int) -> dict[str, str]:
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


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def midstep(store_path: str, idempotent: bool) -> int:
    with Store.open(store_path) as store:
        run = Workflows(store).run("w", "r")
        with run:
            run.step("prep", lambda: "prepared")

            def work() -> str:
                current_step().progress(0.5, cursor={"rows": 5})
                say("MID")
                time.sleep(120)
                return "unreachable"

            run.step("work", work, idempotent=idempotent)
    return 1


def drive(store_path: str, ledger_path: str, n: int) -> int:
    ledger = Path(ledger_path)
    # Started ahead of time by the parent: wait for the previous child to die.
    say("LOADED")
    if sys.stdin.readline().strip() != "go":
        return 3
    with Store.open(store_path) as store:
        run = Workflows(store).run(CHAIN_WORKFLOW, CHAIN_RUN, total_steps=n)
        recorded = [f"recorded {rec.step_id}" for rec in run.ordered_steps()
                    if rec.status == StepStatus.SUCCESS]
        log_line(ledger, "\n".join([f"start {os.getpid()}", *recorded]))

        def body(i: int, prev: str) -> str:
            log_line(ledger, f"body {step_id(i)}")
            say(f"B {step_id(i)}")
            time.sleep(BODY_SECONDS)
            return chain_output(prev, i)

        while True:
            try:
                with run:
                    prev = "seed"
                    for i in range(n):
                        sid = step_id(i)
                        was_done = run.steps.get(sid) is not None and \
                            run.steps[sid].status == StepStatus.SUCCESS
                        prev = run.step(sid, body, i, prev, idempotent=is_idempotent(i))
                        if not was_done:
                            log_line(ledger, f"committed {sid}")
                            say(f"C {sid}")
            except StepNeedsAttentionError as exc:
                # The orchestrator's decision: did the side effect happen?
                sid = exc.step_id
                bodies = ledger.read_text().split("\n")
                if f"body {sid}" in bodies:
                    i = int(sid[1:])
                    prev_out = run.output(step_id(i - 1)) if i else "seed"
                    log_line(ledger, f"resolved {sid} succeed")
                    run.resolve(sid, "succeed", chain_output(prev_out, i))
                else:
                    log_line(ledger, f"resolved {sid} retry")
                    run.resolve(sid, "retry")
                continue
            break
        log_line(ledger, "done")
        return 0 if run.status == "completed" else 1


def main(argv: list[str]) -> int:
    mode = argv[1]
    if mode == "midstep":
        return midstep(argv[2], argv[3] == "1")
    if mode == "drive":
        return drive(argv[2], argv[3], int(argv[4]))
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
