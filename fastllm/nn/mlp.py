"""Position-wise feed-forward layers: plain ``down(act(up x))`` and gated
``down(act(gate x) * up x)`` (GLU variants, Shazeer 2020: SwiGLU with SiLU, GeGLU with GELU).

Activations match transformers' names: ``gelu`` is the exact erf GELU, ``gelu_tanh`` the tanh
approximation (GPT-2's ``gelu_new``, StarCoder's ``gelu_pytorch_tanh``), ``silu``, ``relu``.
The activations are defined once, in :mod:`fastllm.kernels.activation`: where the layer's
``kernels.activation`` resolves to Triton, ``act(gate) * up`` (or ``act(up)``) is one fused elementwise
pass, else its torch reference runs; the matmuls stay cuBLAS (FP8 ones with ``kernels.matmul="fp8"``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Optional

from jaxtyping import Float
from torch import Tensor

from fastllm.kernels import KernelConfig, select
from fastllm.kernels.activation import ACTIVATIONS, activation_reference
from fastllm.kernels.activation import activation as kernel_activation
from fastllm.kernels.activation import gated as kernel_gated
from fastllm.nn import ops
from fastllm.nn.param import Param, normal, zeros

__all__ = ["MLP", "Activation", "activation", "activate", "params", "apply"]

Activation = Literal["silu", "gelu", "gelu_tanh", "relu"]  # the kernel module's ACTIVATIONS
# The weights' logical dims, declared once: params() uses them, and so do the operations in apply().
AXES: dict[str, ops.Axes] = {"w_up": ("mlp", "embed"), "w_gate": ("mlp", "embed"), "w_down": ("embed", "mlp"),
                             "b_up": ("mlp",), "b_gate": ("mlp",), "b_down": ("embed",)}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The torch function ``x -> act(x)`` for ``name`` (the kernel module's reference)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return functools.partial(activation_reference, name=name)


def activate(
    name: str, up: Tensor, gate: Optional[Tensor] = None, *, kernels: Optional[KernelConfig] = None
) -> Tensor:
    """``act(gate) * up`` (gated) or ``act(up)``, fused where ``kernels.activation`` says Triton."""
    impl = select(kernels, "activation", up.device)
    if gate is None:
        return kernel_activation(up, name, impl=impl)
    return kernel_gated(gate, up, name, impl=impl)


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
    kernels: KernelConfig = KernelConfig()  # which implementation runs the activation; matmul precision

    def __post_init__(self):
        activation(self.activation)  # validates the name


def params(layer: MLP) -> dict:
    e, m = layer.embed_dim, layer.mlp_dim
    out_std = layer.std if layer.out_std is None else layer.out_std
    spec = {"w_up": Param((m, e), AXES["w_up"], normal(layer.std))}
    if layer.gated:
        spec["w_gate"] = Param((m, e), AXES["w_gate"], normal(layer.std))
    spec["w_down"] = Param((e, m), AXES["w_down"], normal(out_std))
    if layer.bias:
        spec["b_up"] = Param((m,), AXES["b_up"], zeros())
        if layer.gated:
            spec["b_gate"] = Param((m,), AXES["b_gate"], zeros())
        spec["b_down"] = Param((e,), AXES["b_down"], zeros())
    return spec


def apply(
    layer: MLP, p: dict, x: Float[Tensor, "*batch embed"], *, layout: Optional[ops.Layout] = None,
    x_axes: ops.Axes = ops.STREAM,
) -> Float[Tensor, "*batch embed"]:
    """``layout`` (see :mod:`fastllm.nn.ops`): ``x``'s dims are ``x_axes`` (the residual stream)."""
    projected = [("w_up", "b_up")] + ([("w_gate", "b_gate")] if "w_gate" in p else [])
    up, *gate = ops.projections(layout, x, x_axes, [(p[w], AXES[w], p.get(b)) for w, b in projected],
                                matmul=layer.kernels.matmul)
    hidden = activate(layer.activation, up, gate[0] if gate else None, kernels=layer.kernels)  # [..., mlp]
    return ops.dense(layout, hidden, ops.dense_axes(x_axes, AXES["w_up"]), p["w_down"], AXES["w_down"],
                     p.get("b_down"), matmul=layer.kernels.matmul)
