"""Long-running commands (the sync worker, the dashboard) stop cleanly on a signal."""

from __future__ import annotations

import signal

__all__ = ["stop_on_signals"]


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (what service managers and container runtimes send) stop the
    command cleanly: the replicator finishes its call and the store closes. Installed
    explicitly, since a process started in the background inherits SIGINT ignored."""

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
