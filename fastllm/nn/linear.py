"""Affine maps ``y = x W^T + b`` with torch-style ``[out, in]`` weights (``F.linear``)."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from fastllm.nn.param import Param, normal, zeros

__all__ = ["params", "apply", "linear"]


def params(
    in_dim: int,
    out_dim: int,
    *,
    axes: tuple[str, str],
    bias: bool = False,
    std: float = 0.02,
) -> dict:
    """``{"w": [out, in], "b": [out]}``; ``axes`` names the (out, in) dimensions, e.g.
    ``("mlp", "embed")``: required, because the sharding rules place weights by these names."""
    spec = {"w": Param((out_dim, in_dim), axes, normal(std))}
    if bias:
        spec["b"] = Param((out_dim,), axes[:1], zeros())
    return spec


def linear(
    x: Float[Tensor, "*batch in_dim"],
    w: Float[Tensor, "out_dim in_dim"],
    b: Optional[Float[Tensor, "out_dim"]] = None,
) -> Float[Tensor, "*batch out_dim"]:
    return F.linear(x, w, b)


def apply(p: dict, x: Float[Tensor, "*batch in_dim"]) -> Float[Tensor, "*batch out_dim"]:
    return linear(x, p["w"], p.get("b"))
