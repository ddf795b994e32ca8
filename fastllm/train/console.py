"""What a run shows on rank 0's console while it trains.

On a terminal a live display (rich's progress bar) keeps one line up to date: step, loss,
tokens/s, MFU (on a GPU), memory and the time left. Elsewhere (a log file, ``nohup``, Slurm)
there is nothing to redraw, so a plain line is printed every ``train.log_every`` steps instead,
and each validation loss on its own line in both cases. Other ranks print nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

__all__ = ["Console", "format_record", "live_wanted", "number"]

Stream = Any  # a text stream: anything with write() and flush() (sys.stdout, a StringIO, pytest's capture)


def live_wanted(mode: str, stream: Stream) -> bool:
    """``run.progress``: ``on`` always redraws, ``off`` never, ``auto`` only on a terminal."""
    if mode in ("on", "off"):
        return mode == "on"
    return bool(getattr(stream, "isatty", lambda: False)())


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def number(value: Any, spec: str) -> str:
    """``value`` formatted by ``spec``; a non-finite value logged as text (``"nan"``) as it is."""
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def format_record(record: dict[str, Any], total: int, eta_s: Optional[float]) -> str:
    """One plain line of a training record: ``step 10/900  loss 5.1234  21,000 tok/s  ...``."""
    parts = [f"step {record['step']}/{total}", f"loss {number(record['loss'], '.4f')}"]
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if "memory_gib" in record:
        parts.append(f"mem {record['memory_gib']:.2f} GiB")
    if eta_s is not None:
        parts.append(f"eta {_eta(eta_s)}")
    return "  ".join(parts)


class Console:
    """Rank 0's live display or plain lines; ``enabled=False`` (other ranks) prints nothing."""

    def __init__(self, total: int, start: int, *, mode: str = "auto", enabled: bool = True,
                 stream: Optional[Stream] = None):
        self.total, self.start_step, self.enabled = total, start, enabled
        self.stream = sys.stdout if stream is None else stream
        self.started = time.perf_counter()
        self.live = None
        if enabled and live_wanted(mode, self.stream):
            self.live = _live_display(self.stream, total, start)

    def say(self, text: str) -> None:
        """A line of its own (the start-up block, a validation loss, a note)."""
        if not self.enabled:
            return
        if self.live is not None:
            self.live.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=self.stream, flush=True)

    def eta(self, step: int) -> Optional[float]:
        done = step - self.start_step
        return (time.perf_counter() - self.started) / done * (self.total - step) if done > 0 else None

    def update(self, record: dict[str, Any]) -> None:
        """A training record (``step``, ``loss``, ...): redrawn live, or printed as a line."""
        if not self.enabled:
            return
        if self.live is None:
            print(format_record(record, self.total, self.eta(record["step"])), file=self.stream, flush=True)
            return
        stats = format_record(record, self.total, None).split("  ", 1)[1]  # the bar shows step and ETA itself
        self.live.update(self.live.task_ids[0], completed=record["step"], stats=stats)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def _live_display(stream: Stream, total: int, start: int):
    from rich.console import Console as RichConsole
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[stats]}"),
                        TextColumn("eta"), TimeRemainingColumn(), console=RichConsole(file=stream),
                        refresh_per_second=4)
    progress.add_task("train", total=total, completed=start, stats="")
    progress.start()
    return progress
