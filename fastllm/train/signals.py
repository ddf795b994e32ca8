"""SIGTERM and SIGINT as a request to stop training cleanly: the one place that installs handlers.

A scheduler preempting a job sends SIGTERM; a person at the terminal presses Ctrl-C (SIGINT). Either
way the work since the last checkpoint should not be lost, so inside ``with StopSignals() as stop:``
the first such signal only records itself (``stop.received``); the training loop reads it after
each step, agrees with the other ranks on a step to stop at, saves a checkpoint there and exits.

The same request often arrives twice: Ctrl-C reaches every process of the terminal's foreground
group, torchrun among them, and torchrun forwards it to its workers again. A repeat within
``repeat_window_s`` is taken for that echo. A later one means "now": the handler restores the
default action and sends the signal again, so the process ends at once (killed by the signal) --
the way out when a step or a save hangs. Python runs the handler between bytecodes of the main
thread, so a process blocked inside one long native call (a collective waiting on a dead peer)
acts on it when that call returns or times out (``run.timeout_s``).

The previous handlers come back on exit; outside the main thread (where Python allows no handler)
nothing is installed and ``received`` stays 0.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

__all__ = ["StopSignals", "STOP_SIGNALS", "exit_code"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    """The exit status after a clean stop: 0 for SIGTERM (preemption is not a failure; the job
    resumes), 130 for SIGINT (the shell's code for "interrupted")."""
    return 0 if signum == signal.SIGTERM else 128 + signum


class StopSignals:
    """Records the first stop signal (``received``: its number, 0 for none); see the module docstring."""

    def __init__(self, repeat_window_s: float = 1.0):
        self.repeat_window_s = repeat_window_s
        self.received = 0
        self._first_at = 0.0
        self._previous: Optional[dict] = None

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if not self.received:
            self.received, self._first_at = signum, now
            return
        if now - self._first_at < self.repeat_window_s:
            return  # the same request, delivered again by the terminal or the launcher
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            self._previous = None
