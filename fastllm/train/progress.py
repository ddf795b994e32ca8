"""A one-line terminal progress bar: step, loss, tokens/s, time left. Silent when not on a terminal."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    def __init__(self, total: int, *, start: int = 0, enabled: Optional[bool] = None, stream: TextIO = sys.stderr):
        self.total, self.start_step, self.stream = total, start, stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self.started = time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * step / max(self.total, 1))
        done = step - self.start_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - step) if done else 0.0
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r[{bar}] {step}/{self.total} loss {loss:.4f} {tokens_per_s:,.0f} tok/s eta {eta:.0f}s ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
