"""Triton kernels, each beside its pure-torch reference, chosen per op by a :class:`KernelConfig`.

Every public op takes ``impl`` ("auto" | "triton" | "torch"); pass ``select(config, op, device)`` or
the config field itself. See docs/kernels.md for what each kernel fuses and how it is tested.
"""

from fastllm.kernels.activation import ACTIVATIONS, activation, geglu, gated, gelu, swiglu
from fastllm.kernels.attention import attention
from fastllm.kernels.cast import cast, sum_rows
from fastllm.kernels.cross_entropy import VocabShard, fused_linear_cross_entropy
from fastllm.kernels.fp8 import fp8_linear
from fastllm.kernels.grouped_matmul import grouped_matmul
from fastllm.kernels.moe import Routing, make_routing, moe_combine, moe_dispatch, moe_experts
from fastllm.kernels.norm import layer_norm, rms_norm
from fastllm.kernels.optim import adamw_step, global_norm
from fastllm.kernels.registry import OPS, Choice, KernelConfig, Matmul, resolve, select
from fastllm.kernels.rotary import apply_rotary

__all__ = [
    "Choice", "KernelConfig", "Matmul", "OPS", "resolve", "select",
    "rms_norm", "layer_norm",
    "apply_rotary",
    "ACTIVATIONS", "activation", "gated", "swiglu", "geglu", "gelu",
    "fused_linear_cross_entropy", "VocabShard",
    "adamw_step", "global_norm",
    "Routing", "make_routing", "moe_dispatch", "moe_combine", "moe_experts", "grouped_matmul",
    "attention",
    "cast", "sum_rows",
    "fp8_linear",
]
