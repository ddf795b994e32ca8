"""Triton kernels, each beside its pure-torch reference, chosen per op by a :class:`KernelConfig`."""

from fastllm.kernels.norm import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from fastllm.kernels.registry import OPS, Choice, KernelConfig, resolve, select

__all__ = [
    "Choice", "KernelConfig", "OPS", "resolve", "select",
    "rms_norm", "layer_norm", "rms_norm_reference", "layer_norm_reference",
]
