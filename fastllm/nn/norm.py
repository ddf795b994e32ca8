"""Normalisation layers: LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019).

RMSNorm: ``y = scale * x / sqrt(mean(x^2) + eps)``, computed in float32 and cast back to the input
dtype *before* the scale multiplies, as transformers' Llama does, so bfloat16 results match.
LayerNorm: ``y = scale * (x - mean) / sqrt(var + eps) + bias`` (biased variance), ``F.layer_norm``.
Where ``kernels`` (a :class:`fastllm.kernels.KernelConfig`) resolves to Triton, the fused kernel of
:mod:`fastllm.kernels.norm` runs instead; the functions here are the reference.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from fastllm.kernels import KernelConfig, select
from fastllm.kernels.norm import layer_norm as fused_layer_norm
from fastllm.kernels.norm import rms_norm as fused_rms_norm
from fastllm.nn.param import Param, ones, zeros

__all__ = ["params", "apply", "rms_norm", "layer_norm", "NormKind"]

NormKind = Literal["rmsnorm", "layernorm"]


def params(dim: int, *, kind: NormKind = "rmsnorm", axis: str = "embed") -> dict:
    """``{"scale": [dim]}`` plus ``"bias"`` for LayerNorm."""
    if kind not in ("rmsnorm", "layernorm"):
        raise ValueError(f"norm kind must be 'rmsnorm' or 'layernorm', got {kind!r}")
    spec = {"scale": Param((dim,), (axis,), ones())}
    if kind == "layernorm":
        spec["bias"] = Param((dim,), (axis,), zeros())
    return spec


def rms_norm(
    x: Float[Tensor, "*batch dim"], scale: Float[Tensor, "dim"], eps: float
) -> Float[Tensor, "*batch dim"]:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return scale * normed.to(x.dtype)


def layer_norm(
    x: Float[Tensor, "*batch dim"], scale: Float[Tensor, "dim"], bias: Float[Tensor, "dim"], eps: float
) -> Float[Tensor, "*batch dim"]:
    return F.layer_norm(x, (x.shape[-1],), scale, bias, eps)


def apply(
    p: dict, x: Float[Tensor, "*batch dim"], *, eps: float, kernels: Optional[KernelConfig] = None
) -> Float[Tensor, "*batch dim"]:
    """LayerNorm when the params hold a bias, else RMSNorm: the tree says which it is.

    ``kernels``: which implementation runs (``None``: all ``"auto"``)."""
    if "bias" in p:
        if select(kernels, "layer_norm", x.device) == "triton":
            return fused_layer_norm(x, p["scale"], p["bias"], eps, impl="triton")
        return layer_norm(x, p["scale"], p["bias"], eps)
    if select(kernels, "rms_norm", x.device) == "triton":
        return fused_rms_norm(x, p["scale"], eps, impl="triton")
    return rms_norm(x, p["scale"], eps)
