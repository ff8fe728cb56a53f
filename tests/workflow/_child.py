"""A child process for tests/workflow/test_resume_rules.py, killed with SIGKILL by the parent.

    python tests/workflow/_child.py midstep STORE IDEMPOTENT(0|1)
        drives run "r" of workflow "w": step "prep", then step "work", whose
        body records progress (0.5, cursor {"rows": 5}), prints MID and
        sleeps until it is killed.

The crash-resume torture's child (a chained run killed hundreds of times) is
tests/crash/workflow_load.py, forked by the crash harness's fork server.
"""

from __future__ import annotations

import sys
import time

from walsync.engine import Store
from walsync.engine.workflow import Workflows, current_step


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


def main(argv: list[str]) -> int:
    mode = argv[1]
    if mode == "midstep":
        return midstep(argv[2], argv[3] == "1")
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
