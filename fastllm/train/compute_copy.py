"""The parameters in the compute dtype, kept from one step to the next.

Mixed precision runs the model on a bf16 copy of the fp32 masters. Cast anew every step, the copy
costs a pass that reads the masters and writes it, and the cast's backward a second that widens
every gradient to fp32 before the optimizer reads it again (on Mixtral's shape, 3.1G parameters,
about 16 ms of a 123 ms step on one H100). Where the masters' gradient *is* the copy's gradient
widened, the step skips both: it differentiates the copy itself, the optimizer reads the bf16
gradients and writes the new params, rounded, back into the copy in the same pass
(``optim.apply_gradients(model_copy=...)``). That holds with one micro-batch (accumulating several
in bf16 would round each partial sum), nothing summed across ranks and no ZeRO-3 gather: one device,
``grad_accum=1``. The values are the same as casting: the gradient of a bf16 leaf is bf16 either way,
and the fused kernel rounds the new params as ``Tensor.to`` does.

A copy is reused only while the masters are the very tensors it was written from, at the versions
the optimizer left them: a state swapped for another (a resumed run) or written in place by anything
else (``copy_`` from a checkpoint) makes the next step cast again.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from fastllm import optim, tree

__all__ = ["ComputeCopy", "keeps_copy"]


def keeps_copy(precision: str, grad_accum: int, world_size: int, donate: bool = True) -> bool:
    """Whether a step keeps the copy (see the module docstring); its gradients are then bf16."""
    return precision == "bf16" and grad_accum == 1 and world_size == 1 and donate


class ComputeCopy:
    """The compute-dtype copy of one train state's masters (see the module docstring)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.copy: Optional[Any] = None
        self._written_from: list[tuple[Tensor, int]] = []
        self.casts = 0  # how many times the masters were cast (1 in a run that only steps; tests)

    def of(self, masters: Any) -> Any:
        """The copy of ``masters``: the one the last optimizer step wrote if it is still theirs, else
        a fresh cast."""
        if not self._current(tree.leaves(masters)):
            with torch.no_grad():
                self.copy = optim.cast_tree(masters, self.dtype)
            self.casts += 1
        return self.copy

    def written(self, masters: Any) -> None:
        """The optimizer has just written ``masters`` and, rounded, the copy."""
        self._written_from = [(t, t._version) for t in tree.leaves(masters)]

    def _current(self, leaves: list[Tensor]) -> bool:
        return self.copy is not None and len(leaves) == len(self._written_from) and all(
            t is old and t._version == version for t, (old, version) in zip(leaves, self._written_from))
