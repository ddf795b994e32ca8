"""Token (and learned position) embedding tables: a lookup, ``table[ids]``."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from fastllm.nn import ops
from fastllm.nn.param import Param, normal

__all__ = ["params", "apply", "AXES"]

AXES: ops.Axes = ("vocab", "embed")


def params(num: int, dim: int, *, axes: tuple[str, str] = AXES, std: float = 0.02) -> Param:
    """One ``[num, dim]`` table (a leaf, so the tree reads ``embed.tokens`` not ``embed.tokens.w``)."""
    return Param((num, dim), axes, normal(std))


def apply(
    table: Float[Tensor, "num dim"], ids: Int[Tensor, "*batch"], *, axes: ops.Axes = AXES,
    layout: Optional[ops.Layout] = None, ids_axes: ops.Axes = ("batch", "seq"),
) -> Float[Tensor, "*tokens dim"]:
    """``table[ids]``; ``axes`` are the table's dims as declared, ``ids`` are inputs (see
    :func:`fastllm.nn.ops.lookup`: under a layout the rows come back laid out by the rules, e.g. a
    block of the sequence, so the result's token dims may be a block of the ids')."""
    if layout is None:
        return F.embedding(ids, table)
    return ops.lookup(layout, table, axes, ids, ids_axes)
