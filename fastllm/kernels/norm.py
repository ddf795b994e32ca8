"""RMSNorm (Zhang & Sennrich 2019) and LayerNorm (Ba et al. 2016): one Triton kernel pair for both.

    RMSNorm:   y = scale * x / sqrt(mean(x^2) + eps)
    LayerNorm: y = scale * (x - mean(x)) / sqrt(var(x) + eps) + bias

Forward: one program per row, the whole row in registers (BLOCK >= width), fp32 statistics; the
per-row ``rstd`` (and ``mean``) are kept for backward. Backward, with xhat the normalised input and
g = scale * dy:  dx = rstd * (g - xhat * mean(g * xhat) - mean(g))  (the last term LayerNorm only).
The weight gradient sum_rows(dy * xhat) is reduced without atomics: each program walks a contiguous
slice of rows accumulating its partial sum in registers, and one small torch sum adds the partials.
As in Hugging Face's Llama, RMSNorm rounds the normalised row to the input dtype before the scale.
"""

import functools

import torch
from jaxtyping import Float
from torch import Tensor

from fastllm.kernels import _triton
from fastllm.kernels._triton import tl
from fastllm.kernels.registry import Choice, resolve

__all__ = ["rms_norm", "layer_norm", "rms_norm_reference", "layer_norm_reference"]


def rms_norm_reference(x: Tensor, scale: Tensor, eps: float) -> Tensor:
    x32 = _triton.upcast(x)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return scale * normed.to(x.dtype)


def layer_norm_reference(x: Tensor, scale: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    x32 = _triton.upcast(x)
    bias32 = None if bias is None else bias.to(x32.dtype)
    out = torch.nn.functional.layer_norm(x32, x.shape[-1:], scale.to(x32.dtype), bias32, eps)
    return out.to(x.dtype)


@_triton.jit
def _norm_forward(X, W, B, Y, Mean, Rstd, stride_x, stride_y, n_cols, eps,
                  RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(ACC)
    if RMS:
        centered = x
    else:
        mean = tl.sum(x, axis=0) / n_cols
        centered = tl.where(mask, x - mean, 0.0)
        tl.store(Mean + row, mean)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / n_cols + eps)
    tl.store(Rstd + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    xhat = centered * rstd
    if RMS:
        y = xhat.to(Y.dtype.element_ty).to(ACC) * w
    else:
        y = xhat * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(ACC)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@_triton.jit
def _norm_backward(DY, X, W, Mean, Rstd, DX, DW, DB, stride_dy, stride_x, stride_dx,
                   n_rows, n_cols, rows_per_program,
                   RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK], dtype=ACC)
    db = tl.zeros([BLOCK], dtype=ACC)
    first = program * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    start = first.to(tl.int64)
    DY += start * stride_dy
    X += start * stride_x
    DX += start * stride_dx
    for row in range(first, last):
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(ACC)
        x = tl.load(X + cols, mask=mask, other=0.0).to(ACC)
        rstd = tl.load(Rstd + row)
        if RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(Mean + row)) * rstd, 0.0)
        g = w * dy
        dx = g - xhat * (tl.sum(g * xhat, axis=0) / n_cols)
        if not RMS:
            dx -= tl.sum(g, axis=0) / n_cols
        tl.store(DX + cols, (dx * rstd).to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
        DY += stride_dy
        X += stride_x
        DX += stride_dx
    tl.store(DW + program * n_cols + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB + program * n_cols + cols, db, mask=mask)


def _rows(t: Tensor) -> Tensor:
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class _Norm(torch.autograd.Function):
    """Forward/backward of both norms over the Triton kernels; ``bias`` may be ``None``."""

    @staticmethod
    def forward(x, scale, bias, eps, rms):
        rows = _rows(x)
        n_rows, n_cols = rows.shape
        y = torch.empty_like(rows)
        mean = torch.empty(n_rows, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        rstd = torch.empty_like(mean)
        block = _triton.row_block(n_cols)
        _triton.launch(
            _norm_forward, (n_rows,), x.device, rows, scale, bias if bias is not None else scale,
            y, mean, rstd, rows.stride(0), y.stride(0), n_cols, eps,
            RMS=rms, HAS_BIAS=bias is not None, BLOCK=block, ACC=_triton.accumulator(x.dtype),
            num_warps=_triton.warps_for(block, x.element_size()),
        )
        return y.view(x.shape), mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, scale, bias, eps, rms = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.has_bias, ctx.rms = bias is not None, rms
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dw, db = _triton.plain(functools.partial(_backward, has_bias=ctx.has_bias, rms=ctx.rms),
                                   dy, x, scale, mean, rstd)
        return dx, dw, db, None, None


def _backward(dy, x, scale, mean, rstd, *, has_bias: bool, rms: bool):
    rows, dy_rows = _rows(x), _rows(dy)
    n_rows, n_cols = rows.shape
    programs = _triton.reduction_programs(x.device, n_rows)
    dx = torch.empty_like(rows)
    dw = torch.empty(programs, n_cols, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    db = torch.empty_like(dw) if has_bias else dw
    block = _triton.row_block(n_cols)
    _triton.launch(
        _norm_backward, (programs,), x.device, dy_rows, rows, scale, mean, rstd, dx, dw, db,
        dy_rows.stride(0), rows.stride(0), dx.stride(0), n_rows, n_cols,
        _triton.cdiv(n_rows, programs), RMS=rms, HAS_BIAS=has_bias, BLOCK=block,
        ACC=_triton.accumulator(x.dtype), num_warps=_triton.warps_for(block, x.element_size()),
    )
    dbias = db.sum(0).to(scale.dtype) if has_bias else None
    return dx.view(x.shape), dw.sum(0).to(scale.dtype), dbias


def rms_norm(
    x: Float[Tensor, "*batch embed"], scale: Float[Tensor, " embed"], eps: float = 1e-6,
    *, impl: Choice = "auto",
) -> Float[Tensor, "*batch embed"]:
    """RMSNorm over the last dim; ``impl`` picks the Triton kernel or the torch reference."""
    if resolve(impl, x.device) == "torch":
        return rms_norm_reference(x, scale, eps)
    return _Norm.apply(x, scale, None, float(eps), True)[0]


def layer_norm(
    x: Float[Tensor, "*batch embed"], scale: Float[Tensor, " embed"],
    bias: Float[Tensor, " embed"] | None, eps: float = 1e-5, *, impl: Choice = "auto",
) -> Float[Tensor, "*batch embed"]:
    """LayerNorm over the last dim (``bias`` optional)."""
    if resolve(impl, x.device) == "torch":
        return layer_norm_reference(x, scale, bias, eps)
    return _Norm.apply(x, scale, bias, float(eps), False)[0]
