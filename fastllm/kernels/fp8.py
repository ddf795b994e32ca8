"""``x W^T`` with FP8 operands: the three matmuls of a linear layer's step on FP8 tensor cores.

Hopper's tensor cores multiply FP8 at about twice their bf16 rate. Each operand is scaled so that
its largest magnitude lands on the format's largest finite value, rounded to FP8, and multiplied by
``torch._scaled_mm`` (cuBLAS), which undoes the two scales in its fp32 accumulator and writes the
result in the input's dtype. Scales are dynamic and per tensor (one per operand, from its current
amax): nothing carries over between steps, so the op is a pure function.

* forward ``y = x W^T``: ``x`` and ``W`` in e4m3 (3 mantissa bits, range 448);
* backward ``dx = dy W`` and ``dW = dy^T x``: the output gradient in e5m2 (range 57344: gradients
  span more decades than they need digits), ``x`` and ``W`` reused from the forward in e4m3, so the
  saved activation is the FP8 copy (half the bytes of bf16).

A scale is per tensor *of this call*, so a micro-batch's or a rank's share of the tokens sets its
own: layouts and micro-batch splits agree within FP8 rounding, not bf16 rounding.
``_scaled_mm`` needs every dim a multiple of 16 and, on CUDA, compute capability 8.9 or later;
elsewhere the product is emulated with the same numbers (operands rounded through FP8, product in
fp32), which is also what the GPU tests hold the fast path to.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["fp8_linear", "quantize"]

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
_TINY = 1e-12  # amax floor: an all-zero tensor gets a finite scale


def quantize(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(``x`` scaled onto ``dtype``'s range and rounded to it, the fp32 0-d factor that undoes the
    scale): ``x ~ q.float() * inverse``."""
    top = torch.finfo(dtype).max
    amax = x.detach().abs().amax().float().clamp(min=_TINY)
    scale = top / amax
    return (x.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


def _native(a: Tensor, b: Tensor) -> bool:
    """Whether ``_scaled_mm`` takes ``a @ b``: FP8 tensor cores (CUDA 8.9+) and every dim a multiple
    of 16. (CPU builds have a ``_scaled_mm`` too, hundreds of times slower than emulating it.)"""
    if a.device.type != "cuda" or any(n % 16 for n in (*a.shape, b.shape[1])):
        return False
    props = torch.cuda.get_device_properties(a.device)
    return (props.major, props.minor) >= (8, 9)


def _scaled(a: Tensor, a_inverse: Tensor, b: Tensor, b_inverse: Tensor, dtype: torch.dtype) -> Tensor:
    """``_scaled_mm`` of FP8 ``a [M, K]`` and ``b [K, N]``, each in the layout cuBLAS wants (``a``
    row-major, ``b`` column-major: a transposed copy where it is not)."""
    return torch._scaled_mm(a.contiguous(), b.t().contiguous().t(), scale_a=a_inverse, scale_b=b_inverse,
                            out_dtype=dtype)


def _product(a: Tensor, a_inverse: Tensor, b: Tensor, b_inverse: Tensor, dtype: torch.dtype) -> Tensor:
    """``(a * a_inverse) @ (b * b_inverse)`` in ``dtype``, for FP8 ``a [M, K]`` and ``b [K, N]``."""
    if _native(a, b):
        return _scaled(a, a_inverse, b, b_inverse, dtype)
    return ((a.float() * a_inverse) @ (b.float() * b_inverse)).to(dtype)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        x8, x_inverse = quantize(x, E4M3)
        w8, w_inverse = quantize(w, E4M3)
        ctx.save_for_backward(x8, x_inverse, w8, w_inverse)
        ctx.dtypes = (x.dtype, w.dtype)
        return _product(x8, x_inverse, w8.t(), w_inverse, x.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor]:
        x8, x_inverse, w8, w_inverse = ctx.saved_tensors
        dy8, dy_inverse = quantize(dy, E5M2)
        dx = _product(dy8, dy_inverse, w8, w_inverse, ctx.dtypes[0])
        dw = _product(dy8.t(), dy_inverse, x8, x_inverse, ctx.dtypes[1])
        return dx, dw


def fp8_linear(x: Float[Tensor, "tokens in_dim"], w: Float[Tensor, "out_dim in_dim"]) -> Float[Tensor, "tokens out_dim"]:
    """``x W^T`` through FP8 (see the module), differentiable in both operands."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"fp8_linear: x [tokens, in] and w [out, in], got {tuple(x.shape)} and {tuple(w.shape)}")
    return _FP8Linear.apply(x, w)
