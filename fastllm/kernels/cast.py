"""A floating-point tensor in another dtype, in one vectorised pass.

PyTorch's bfloat16 -> float32 copy runs an unvectorised elementwise kernel: about 1.6 TB/s on an
H200, 30 ms of a Llama-8B ZeRO-3 step spent widening the gradients before their float32
reduce-scatter. Here each program moves whole 16-byte runs. Only widening casts (exact) take the
kernel; narrowing ones (rounding), other devices, non-contiguous input, or ``impl="torch"`` use
``Tensor.to``.

:func:`sum_rows` is the reduction half of a reduce-scatter whose transfers went elsewhere (the
copy-engine transport of :mod:`fastllm.sharding.p2p`): the ``n`` rows that the ranks sent, summed
in float32 in row order and written once in the result's dtype.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from fastllm.kernels import _triton
from fastllm.kernels._triton import tl
from fastllm.kernels.registry import Choice, resolve

__all__ = ["cast", "sum_rows"]

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


@_triton.jit
def _sum_rows(X, Y, n_rows, m, stride, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < m
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for row in range(n_rows):
        acc += tl.load(X + row * stride + idx, mask=mask).to(tl.float32)
    tl.store(Y + idx, acc.to(Y.dtype.element_ty), mask=mask)


def sum_rows(rows: Float[Tensor, "n m"], dtype: torch.dtype, *, out: Tensor | None = None,
             impl: Choice = "auto") -> Float[Tensor, "m"]:
    """``rows.float().sum(0).to(dtype)`` in one pass: each element accumulated in float32, rows in
    order (0, 1, ...), rounded once; written into ``out`` (``[m]``, ``dtype``) when given."""
    if rows.ndim != 2 or not dtype.is_floating_point or not rows.is_floating_point():
        raise ValueError(f"sum_rows: takes a 2-D float tensor and a float dtype, got {tuple(rows.shape)} "
                         f"{rows.dtype} -> {dtype}")
    if out is not None and (out.shape != rows.shape[1:] or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"sum_rows: out must be a contiguous {dtype} tensor of shape {tuple(rows.shape[1:])}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    if dtype != torch.float32 and (resolve(impl, rows.device) != "torch" and rows.numel()):
        # The kernel writes float32 only (one rounding either way); narrowing is torch's, which
        # rounds to nearest-even on every device (Triton's CPU interpreter does not).
        total = sum_rows(rows, torch.float32, impl=impl)
        return total.to(dtype) if out is None else out.copy_(total)
    if resolve(impl, rows.device) == "torch" or rows.stride(1) != 1 or rows.numel() == 0:
        total = rows[0].float() if rows.shape[0] else rows.new_zeros(rows.shape[1:], dtype=torch.float32)
        for row in rows[1:]:
            total = total + row.float()
        return total.to(dtype) if out is None else out.copy_(total)
    out = torch.empty(rows.shape[1:], dtype=dtype, device=rows.device) if out is None else out
    _triton.launch(_sum_rows, (_triton.cdiv(rows.shape[1], _BLOCK),), rows.device, rows, out, rows.shape[0],
                   rows.shape[1], rows.stride(0), BLOCK=_BLOCK, num_warps=_WARPS)
    return out
