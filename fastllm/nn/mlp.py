"""Position-wise feed-forward layers: plain ``down(act(up x))`` and gated
``down(act(gate x) * up x)`` (GLU variants, Shazeer 2020: SwiGLU with SiLU, GeGLU with GELU).

Activations match transformers' names: ``gelu`` is the exact erf GELU, ``gelu_tanh`` the tanh
approximation (GPT-2's ``gelu_new``, StarCoder's ``gelu_pytorch_tanh``), ``silu``, ``relu``.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Literal, Optional

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from fastllm.nn import layout as _layout
from fastllm.nn.param import Param, normal, zeros

__all__ = ["MLP", "Activation", "activation", "params", "apply"]

Activation = Literal["silu", "gelu", "gelu_tanh", "relu"]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


@dataclass(frozen=True)
class MLP:
    """Shapes and options of one feed-forward layer. ``out_std`` (default ``std``) inits ``w_down``."""

    embed_dim: int
    mlp_dim: int
    activation: Activation = "silu"
    gated: bool = True
    bias: bool = False
    std: float = 0.02
    out_std: Optional[float] = None

    def __post_init__(self):
        activation(self.activation)  # validates the name


def params(layer: MLP) -> dict:
    e, m = layer.embed_dim, layer.mlp_dim
    out_std = layer.std if layer.out_std is None else layer.out_std
    spec = {"w_up": Param((m, e), ("mlp", "embed"), normal(layer.std))}
    if layer.gated:
        spec["w_gate"] = Param((m, e), ("mlp", "embed"), normal(layer.std))
    spec["w_down"] = Param((e, m), ("embed", "mlp"), normal(out_std))
    if layer.bias:
        spec["b_up"] = Param((m,), ("mlp",), zeros())
        if layer.gated:
            spec["b_gate"] = Param((m,), ("mlp",), zeros())
        spec["b_down"] = Param((e,), ("embed",), zeros())
    return spec


def apply(
    layer: MLP, p: dict, x: Float[Tensor, "*batch embed"], *, layout: Optional[_layout.Layout] = None
) -> Float[Tensor, "*batch embed"]:
    """``layout`` (see :mod:`fastllm.nn.layout`): ``mlp`` may be this rank's shard of the units."""
    act = activation(layer.activation)
    x = _layout.enter_parallel(layout, x)  # column parallel: w_up/w_gate split along mlp
    up = F.linear(x, p["w_up"], p.get("b_up"))  # [..., mlp]
    if "w_gate" in p:
        hidden = act(F.linear(x, p["w_gate"], p.get("b_gate"))) * up
    else:
        hidden = act(up)
    return _layout.row_parallel_linear(layout, hidden, p["w_down"], p.get("b_down"))
