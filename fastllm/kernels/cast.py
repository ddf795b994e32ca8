"""A floating-point tensor in another dtype, in one vectorised pass.

PyTorch's bfloat16 -> float32 copy runs an unvectorised elementwise kernel: about 1.6 TB/s on an
H200, 30 ms of a Llama-8B ZeRO-3 step spent widening the gradients before their float32
reduce-scatter. Here each program moves whole 16-byte runs. Only widening casts (exact) take the
kernel; narrowing ones (rounding), other devices, non-contiguous input, or ``impl="torch"`` use
``Tensor.to``.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from fastllm.kernels import _triton
from fastllm.kernels._triton import tl
from fastllm.kernels.registry import Choice, resolve

__all__ = ["cast"]

_BLOCK = 8192  # elements per program
_WARPS = 8


@_triton.jit
def _cast(X, Y, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    tl.store(Y + idx, tl.load(X + idx, mask=mask).to(Y.dtype.element_ty), mask=mask)


def cast(x: Float[Tensor, "..."], dtype: torch.dtype, *, impl: Choice = "auto") -> Float[Tensor, "..."]:
    """``x.to(dtype)`` (``x`` itself when it already has ``dtype``)."""
    if not dtype.is_floating_point:
        raise ValueError(f"cast: {dtype} is not a floating-point dtype")
    if x.dtype == dtype:
        return x
    widening = dtype.itemsize > x.dtype.itemsize
    if not widening or resolve(impl, x.device) == "torch" or not x.is_contiguous() or x.numel() == 0:
        return x.to(dtype)
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    _triton.launch(_cast, (_triton.cdiv(x.numel(), _BLOCK),), x.device, x, y, x.numel(), BLOCK=_BLOCK,
                   num_warps=_WARPS)
    return y
