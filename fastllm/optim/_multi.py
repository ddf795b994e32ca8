"""Arithmetic over lists of tensors, picking the faster form for the mode we run in.

Eager: ``torch._foreach_*`` ops, which launch one kernel for many tensors (per-leaf ops on a ~200
leaf model are launch-bound). Under ``torch.compile``: plain per-tensor ops, which inductor fuses
vertically (a whole chain of pointwise ops becomes one kernel per leaf), measured faster there.
All ops return new tensors; none mutates its inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mul", "add", "norms"]


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def mul(tensors: list, factor) -> list:
    """``[t * factor]``; ``factor`` a number or a 0-d tensor."""
    if _compiling():
        return [t * factor for t in tensors]
    return list(torch._foreach_mul(tensors, factor))


def add(a: list, b: list, alpha: float = 1.0) -> list:
    """``[x + alpha * y]``."""
    if _compiling():
        return [x + alpha * y for x, y in zip(a, b)]
    return list(torch._foreach_add(a, b, alpha=alpha))


def norms(tensors: list) -> list[Tensor]:
    """The float32 L2 norm of each tensor."""
    if _compiling():
        return [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]
    return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
