"""What every rank must decide alike after a step, without a host sync of its own.

**Stop and save** (:class:`StepControl`). A stop signal reaches one rank or several, at different
moments; the checkpoint clock (``train.checkpoint_minutes``) runs on each rank's own clock. Both
become flags ``[signal number, checkpoint due]`` that every rank posts after each step in an
*asynchronous* MAX all-reduce of a CPU tensor over a gloo group (so NCCL runs use it too), and
collects one step later, when it finished long ago. Every rank reads the same reduced flags after
the same step, so all stop, or save, at that step; the decision costs one step of delay and no
wait. One process reads its flags directly. Measured in docs/reliability.md.

**Non-finite steps** (:class:`BadSteps`). The train step skips a step whose loss or gradient is
not finite and flags it on the device, identically on every rank (fastllm/train/step.py). The
counts (in all, in a row, the longest run, the last bad step) stay on the device too; the Trainer
reads them where it reads the metrics anyway, at its log points.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Decision", "StepControl", "BadSteps", "control_group"]


def control_group(world_size: int) -> Optional[dist.ProcessGroup]:
    """A gloo group of the whole world for small CPU flags (``None`` for one process). Collective:
    every rank creates it at the same point."""
    return dist.new_group(backend="gloo") if world_size > 1 else None


@dataclass(frozen=True)
class Decision:
    stop: int = 0  # the signal that asks to stop (0: go on)
    checkpoint: bool = False  # the checkpoint clock ran out


class StepControl:
    """``after_step()`` returns the decision every rank takes after this step (module docstring).
    ``signals``: anything with a ``received`` signal number; ``checkpoint_s``: 0 for no clock."""

    def __init__(self, group: Optional[dist.ProcessGroup], signals, checkpoint_s: float):
        self.group, self.signals, self.checkpoint_s = group, signals, checkpoint_s
        self._clock = time.monotonic()
        self._saves = 0  # saves happen at agreed steps, so this count agrees across ranks
        self._pending: Optional[tuple] = None

    def saved(self) -> None:
        """A checkpoint was written: the clock starts again."""
        self._clock, self._saves = time.monotonic(), self._saves + 1

    def _flags(self) -> list[int]:
        due = self.checkpoint_s > 0 and time.monotonic() - self._clock >= self.checkpoint_s
        return [int(self.signals.received), int(due)]

    def after_step(self) -> Decision:
        if self.group is None:
            stop, due = self._flags()
            return Decision(stop, bool(due))
        agreed = self._collect()
        flags = torch.tensor(self._flags(), dtype=torch.int64)
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self._pending = (work, flags, self._saves)
        return agreed

    def _collect(self) -> Decision:
        if self._pending is None:
            return Decision()
        (work, flags, saves), self._pending = self._pending, None
        work.wait()
        stop, due = (int(v) for v in flags)
        # a save since these flags were posted already reset the clock they speak of
        return Decision(stop, bool(due) and saves == self._saves)

    def close(self, *, clean: bool = True) -> None:
        """Collect the last reduction (posted on every rank) before the group goes away; after a
        failure a peer may never post it, so it is left behind instead."""
        if clean:
            self._collect()
        self._pending = None


class BadSteps:
    """Device counts of skipped (non-finite) steps: ``add`` each step, ``read`` at a log point."""

    def __init__(self, device: torch.device):
        # [in all, in a row now, longest run in a row, last bad step]
        self._counts = torch.zeros(4, dtype=torch.int64, device=device)
        self.reported = 0  # of "in all", what the caller has said already

    def add(self, nonfinite: Tensor, step: int) -> None:
        bad = nonfinite.to(torch.int64)
        total, run, longest, last = self._counts.unbind()
        run = (run + 1) * bad
        self._counts = torch.stack([total + bad, run, torch.maximum(longest, run),
                                    torch.where(nonfinite, step, last)])

    def read(self) -> tuple[int, int, int, int]:
        """(in all, in a row now, longest run, last bad step): one read of four integers."""
        total, run, longest, last = self._counts.tolist()
        return total, run, longest, last
