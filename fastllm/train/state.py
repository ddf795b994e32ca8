"""The training state: everything a step reads and writes, as one immutable value.

``TrainState(params, opt_state, step, key, loss_scale)``: fp32 master parameters, the optimizer
state (fp32 moments), the number of optimizer steps taken, the run's random key and, for fp16, the
dynamic loss-scaling state (:class:`fastllm.optim.LossScale`). A step returns a new state; nothing
is mutated in place, so a state that was saved and loaded continues exactly like the one that never
left memory.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

from fastllm import random
from fastllm.optim import LossScale

__all__ = ["TrainState"]


class TrainState(NamedTuple):
    params: Any  # fp32 master weights
    opt_state: Any
    step: int  # optimizer steps taken so far
    key: random.Key
    loss_scale: Optional[LossScale] = None  # fp16 only
