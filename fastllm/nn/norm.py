"""Normalisation layers: LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019).

RMSNorm: ``y = scale * x / sqrt(mean(x^2) + eps)``, computed in float32 and cast back to the input
dtype *before* the scale multiplies, as transformers' Llama does, so bfloat16 results match.
LayerNorm: ``y = scale * (x - mean) / sqrt(var + eps) + bias`` (biased variance), ``F.layer_norm``.
Both are defined once, in :mod:`fastllm.kernels.norm`, beside their fused Triton kernel:
``rms_norm``/``layer_norm`` here are its torch references, and ``apply`` runs whichever
implementation ``kernels`` (a :class:`fastllm.kernels.KernelConfig`) resolves to.
"""

from __future__ import annotations

from typing import Literal, Optional

from jaxtyping import Float
from torch import Tensor

from fastllm.kernels import KernelConfig, select
from fastllm.kernels import norm as kernel
from fastllm.kernels.norm import layer_norm_reference as layer_norm
from fastllm.kernels.norm import rms_norm_reference as rms_norm
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


def apply(
    p: dict, x: Float[Tensor, "*batch dim"], *, eps: float, kernels: Optional[KernelConfig] = None
) -> Float[Tensor, "*batch dim"]:
    """LayerNorm when the params hold a bias, else RMSNorm: the tree says which it is.

    ``kernels``: which implementation runs (``None``: all ``"auto"``)."""
    if "bias" in p:
        return kernel.layer_norm(x, p["scale"], p["bias"], eps, impl=select(kernels, "layer_norm", x.device))
    return kernel.rms_norm(x, p["scale"], eps, impl=select(kernels, "rms_norm", x.device))
