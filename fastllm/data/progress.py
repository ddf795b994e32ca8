"""A dependency-free progress line on stderr: redrawn in place on a terminal, printed every few
seconds otherwise (so logs of batch jobs stay short)."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

__all__ = ["Progress"]


class Progress:
    def __init__(self, label: str, stream: Optional[TextIO] = None, enabled: bool = True,
                 interval_s: Optional[float] = None):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s if interval_s is not None else (0.2 if self.tty else 10.0)
        self.start = time.perf_counter()
        self._last = -float("inf")

    def update(self, docs: int, tokens: int, files_done: int, files_total: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last < self.interval_s):
            return
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        line = (f"{self.label}: files {files_done}/{files_total}  docs {docs:,}  tokens {tokens:,}  "
                f"{tokens / elapsed:,.0f} tok/s  {elapsed:.1f}s")
        self.stream.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
