"""Token (and learned position) embedding tables: a lookup, ``table[ids]``."""

from __future__ import annotations

import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from fastllm.nn.param import Param, normal

__all__ = ["params", "apply"]


def params(
    num: int, dim: int, *, axes: tuple[str, str] = ("vocab", "embed"), std: float = 0.02
) -> Param:
    """One ``[num, dim]`` table (a leaf, so the tree reads ``embed.tokens`` not ``embed.tokens.w``)."""
    return Param((num, dim), axes, normal(std))


def apply(
    table: Float[Tensor, "num dim"], ids: Int[Tensor, "*batch"]
) -> Float[Tensor, "*batch dim"]:
    return F.embedding(ids, table)
