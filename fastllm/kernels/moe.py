"""Mixture-of-experts token permutation: dispatch tokens to expert-sorted rows, combine them back.

With ``k`` experts per token, slot ``s = t * k + j`` is token ``t``'s ``j``-th choice. A stable sort
of the slots by expert gives ``order`` (sorted row -> slot) and its inverse ``row_of_slot``; each
expert's rows are then contiguous (``offsets``), ready for :func:`grouped_matmul`. Nothing is
dropped and nothing is padded to a capacity.

    dispatch:  xs[r] = x[order[r] // k]                     backward: dx[t] = sum_j dxs[row_of_slot[t, j]]
    combine:   out[t] = sum_j w[t, j] * ys[row_of_slot[t, j]]
               backward: dys[r] = w[slot] * dout[token],  dw[slot] = <dout[token], ys[r]>  (slot = order[r])

Two row kernels cover all four directions: a gather (optionally scaled, optionally emitting the dot
product with a second row) and a weighted k-way sum. Neither uses atomics, so results are
deterministic. :func:`moe_experts` strings them together into the SwiGLU experts of Mixtral.
"""

import functools
from typing import NamedTuple, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from fastllm.kernels import _triton
from fastllm.kernels._triton import tl
from fastllm.kernels.activation import gated
from fastllm.kernels.grouped_matmul import grouped_matmul
from fastllm.kernels.registry import Choice, resolve

__all__ = ["Routing", "make_routing", "moe_dispatch", "moe_combine", "moe_experts",
           "moe_dispatch_reference", "moe_combine_reference"]

_BLOCK = 4096  # columns per step of a row loop (and the row tile's width)
_GATHER_ROWS = 1
_GATHER_WARPS = 8
_SUM_WARPS = 8


class Routing(NamedTuple):
    """Where every (token, choice) slot goes; all on the device, built without a host sync."""

    order: Tensor  # [tokens * k] sorted row -> slot
    row_of_slot: Tensor  # [tokens * k] slot -> sorted row
    offsets: Tensor  # [experts + 1] first sorted row of each expert
    top_k: int


def make_routing(experts: Int[Tensor, "tokens k"], n_experts: int) -> Routing:
    """Sort the (token, choice) slots by expert (stable: ties keep token order)."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    row_of_slot = torch.empty_like(order)
    row_of_slot[order] = torch.arange(order.numel(), device=order.device)
    offsets = torch.zeros(n_experts + 1, device=flat.device, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.bincount(flat, minlength=n_experts), 0)
    return Routing(order, row_of_slot, offsets, experts.shape[-1])


def moe_dispatch_reference(x: Tensor, routing: Routing) -> Tensor:
    return x.index_select(0, routing.order // routing.top_k)


def moe_combine_reference(ys: Tensor, weights: Tensor, routing: Routing) -> Tensor:
    picked = ys.index_select(0, routing.row_of_slot).view(*weights.shape, ys.shape[-1])
    acc = torch.promote_types(ys.dtype, weights.dtype)
    return (picked.to(acc) * weights[..., None].to(acc)).sum(1).to(ys.dtype)


@_triton.jit
def _gather_rows(SRC, DST, SOURCE_ROW, SCALE, OTHER, DOT, n_rows, n_cols, stride_src, stride_dst,
                 stride_other, HAS_SCALE: tl.constexpr, HAS_DOT: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK: tl.constexpr, ACC: tl.constexpr):
    """DST[r] = SRC[SOURCE_ROW[r]] (* SCALE[r]); DOT[r] = <SRC[SOURCE_ROW[r]], OTHER[r]>; ROWS rows
    per program, so each program has several independent row copies in flight."""
    row_ids = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = row_ids < n_rows
    rows = row_ids[:, None]
    src = SRC + tl.load(SOURCE_ROW + row_ids, mask=row_ok, other=0).to(tl.int64)[:, None] * stride_src
    scale = tl.full([ROWS, 1], 1.0, ACC)
    if HAS_SCALE:
        scale = tl.load(SCALE + row_ids, mask=row_ok, other=0.0).to(ACC)[:, None]
    dot = tl.zeros([ROWS, BLOCK], dtype=ACC)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)[None, :]
        mask = row_ok[:, None] & (cols < n_cols)
        values = tl.load(src + cols, mask=mask, other=0.0).to(ACC)
        tl.store(DST + rows * stride_dst + cols, (values * scale).to(DST.dtype.element_ty), mask=mask)
        if HAS_DOT:
            dot += values * tl.load(OTHER + rows * stride_other + cols, mask=mask, other=0.0).to(ACC)
    if HAS_DOT:
        tl.store(DOT + row_ids, tl.sum(dot, axis=1), mask=row_ok)


@_triton.jit
def _sum_rows(SRC, DST, ROWS, WEIGHTS, n_cols, stride_src, stride_dst, K: tl.constexpr,
              HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """DST[t] = sum_j WEIGHTS[t, j] * SRC[ROWS[t, j]], accumulated in ACC; the K loads unrolled."""
    token = tl.program_id(0).to(tl.int64)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        acc = tl.zeros([BLOCK], dtype=ACC)
        for j in tl.static_range(K):
            source = tl.load(ROWS + token * K + j).to(tl.int64)
            values = tl.load(SRC + source * stride_src + cols, mask=mask, other=0.0).to(ACC)
            if HAS_WEIGHTS:
                values *= tl.load(WEIGHTS + token * K + j).to(ACC)
            acc += values
        tl.store(DST + token * stride_dst + cols, acc.to(DST.dtype.element_ty), mask=mask)


def _block(n_cols: int) -> int:
    return min(_BLOCK, _triton.row_block(n_cols))


def _gather(src: Tensor, source_row: Tensor, scale: Optional[Tensor] = None,
            other: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    rows, n_cols = source_row.numel(), src.shape[1]
    dst = torch.empty(rows, n_cols, device=src.device, dtype=src.dtype)
    acc = torch.promote_types(src.dtype, torch.float32)
    dot = torch.empty(rows, device=src.device, dtype=acc) if other is not None else None
    block = _block(n_cols)
    tile_rows = max(1, min(_GATHER_ROWS, 4 * _BLOCK // block))
    _triton.launch(_gather_rows, (_triton.cdiv(rows, tile_rows),), src.device, src, dst, source_row,
                   src if scale is None else scale, src if other is None else other,
                   dst if dot is None else dot, rows, n_cols, src.stride(0), dst.stride(0),
                   0 if other is None else other.stride(0), HAS_SCALE=scale is not None,
                   HAS_DOT=other is not None, ROWS=tile_rows, BLOCK=block, ACC=_triton.accumulator(acc),
                   num_warps=_GATHER_WARPS)
    return dst, dot


def _sum(src: Tensor, rows: Tensor, k: int, weights: Optional[Tensor] = None) -> Tensor:
    tokens, n_cols = rows.numel() // k, src.shape[1]
    dst = torch.empty(tokens, n_cols, device=src.device, dtype=src.dtype)
    block = _block(n_cols)
    _triton.launch(_sum_rows, (tokens,), src.device, src, dst, rows, src if weights is None else weights,
                   n_cols, src.stride(0), dst.stride(0), K=k, HAS_WEIGHTS=weights is not None,
                   BLOCK=block, ACC=_triton.accumulator(torch.promote_types(src.dtype, torch.float32)),
                   num_warps=_SUM_WARPS)
    return dst


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(x, order, row_of_slot, k):
        return _gather(x, order // k)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, row_of_slot, k = inputs
        ctx.save_for_backward(row_of_slot)
        ctx.k = k

    @staticmethod
    def backward(ctx, dxs):
        (row_of_slot,) = ctx.saved_tensors
        dx = _triton.plain(lambda d, rows: _sum(d.contiguous(), rows, ctx.k), dxs, row_of_slot)
        return dx, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ys, weights, order, row_of_slot, k):
        return _sum(ys, row_of_slot, k, weights.contiguous())

    @staticmethod
    def setup_context(ctx, inputs, output):
        ys, weights, order, row_of_slot, k = inputs
        ctx.save_for_backward(ys, weights, order)
        ctx.k = k

    @staticmethod
    def backward(ctx, dout):
        ys, weights, order = ctx.saved_tensors
        dys, dweights = _triton.plain(functools.partial(_combine_backward, k=ctx.k), dout, ys, weights, order)
        return dys, dweights, None, None, None


def _combine_backward(dout, ys, weights, order, *, k: int):
    slot_weight = weights.reshape(-1).index_select(0, order)
    dys, dot = _gather(dout.contiguous(), order // k, slot_weight, other=ys)
    dweights = torch.empty_like(dot).index_put_((order,), dot).view(weights.shape)
    return dys, dweights.to(weights.dtype)


def moe_dispatch(x: Float[Tensor, "tokens embed"], routing: Routing, *, impl: Choice = "auto",
                 ) -> Float[Tensor, "slots embed"]:
    """Copies of token rows in expert order: row ``r`` holds token ``order[r] // k``."""
    if resolve(impl, x.device) == "torch":
        return moe_dispatch_reference(x, routing)
    return _Dispatch.apply(x.contiguous(), routing.order, routing.row_of_slot, routing.top_k)


def moe_combine(ys: Float[Tensor, "slots embed"], weights: Float[Tensor, "tokens k"],
                routing: Routing, *, impl: Choice = "auto") -> Float[Tensor, "tokens embed"]:
    """Each token's expert outputs, weighted by its routing weights and summed (in ``ys``' dtype)."""
    if resolve(impl, ys.device) == "torch":
        return moe_combine_reference(ys, weights, routing)
    return _Combine.apply(ys.contiguous(), weights, routing.order, routing.row_of_slot, routing.top_k)


def moe_experts(
    x: Float[Tensor, "tokens embed"],
    weights: Float[Tensor, "tokens k"],
    experts: Int[Tensor, "tokens k"],
    w_gate: Float[Tensor, "experts mlp embed"],
    w_up: Float[Tensor, "experts mlp embed"],
    w_down: Float[Tensor, "experts embed mlp"],
    *,
    activation: str = "silu",
    impl: Choice = "auto",
) -> Float[Tensor, "tokens embed"]:
    """``sum_j weights[t, j] * down_e(act(gate_e x) * up_e x)`` with ``e = experts[t, j]`` (Mixtral)."""
    routing = make_routing(experts, w_gate.shape[0])
    xs = moe_dispatch(x, routing, impl=impl)  # [tokens * k, embed], grouped by expert
    hidden = gated(grouped_matmul(xs, w_gate, routing.offsets, impl=impl),
                   grouped_matmul(xs, w_up, routing.offsets, impl=impl), activation, impl=impl)
    ys = grouped_matmul(hidden, w_down, routing.offsets, impl=impl)  # [tokens * k, embed]
    return moe_combine(ys, weights, routing, impl=impl)
