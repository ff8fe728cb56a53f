"""A child process for tests/aio/test_aio_crash_resume.py, killed with SIGKILL by the parent.

    python tests/aio/_run_child.py MODE STORE LOG

drives run "r" of workflow "w" through STEPS steps ``s00``.. (each body appends
"start <i>" to LOG, records progress with cursor i, then returns i*i) and the
non-idempotent step "charge" in the middle; MODE ``async`` drives it with
``async with`` and runs the steps in groups of five at once (``gather``),
``sync`` with ``with run:`` one by one. It prints one line per step body
started, so the parent can kill it at a chosen moment.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from walsync.engine import Store
from walsync.engine.workflow import Workflows, current_async_step, current_step

STEPS = 40
GROUP = 5
CHARGE_AFTER = 20


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def note(log: str, text: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def drive_sync(store_path: str, log: str) -> None:
    def body(i: int) -> int:
        note(log, f"start {i}")
        say(f"STEP {i}")
        current_step().progress(0.5, cursor=i)
        return i * i

    def charge() -> str:
        note(log, "start charge")
        say("STEP charge")
        time.sleep(1.0)  # a kill after its line lands in its body
        return "charged"

    with Store.open(store_path) as store:
        run = Workflows(store).run("w", "r")
        with run:
            for i in range(STEPS):
                if i == CHARGE_AFTER:
                    run.step("charge", charge, idempotent=False)
                run.step(f"s{i:02d}", body, i)


async def drive_async(store_path: str, log: str) -> None:
    async def body(i: int) -> int:
        note(log, f"start {i}")
        say(f"STEP {i}")
        await current_async_step().progress(0.5, cursor=i)
        await asyncio.sleep(0)
        return i * i

    async def charge() -> str:
        note(log, "start charge")
        say("STEP charge")
        await asyncio.sleep(1.0)  # a kill after its line lands in its body
        return "charged"

    with Store.open(store_path) as store:
        async with Workflows(store).arun("w", "r") as run:
            for first in range(0, STEPS, GROUP):
                if first == CHARGE_AFTER:
                    await run.step("charge", charge, idempotent=False)
                await asyncio.gather(*(run.step(f"s{i:02d}", body, i)
                                       for i in range(first, first + GROUP)))


def main(argv: list[str]) -> int:
    mode, store_path, log = argv[1], argv[2], argv[3]
    if mode == "sync":
        drive_sync(store_path, log)
    elif mode == "async":
        asyncio.run(drive_async(store_path, log))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    say("DONE")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
