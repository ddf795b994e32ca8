"""Rotary position embeddings (RoFormer, Su et al. 2021), "rotate_half" layout, q and k in one pass.

With ``x = (x1, x2)`` the two halves of the first ``rot`` dims of a head and ``c = (c1, c2)``,
``s = (s1, s2)`` the halves of cos/sin (transformers' layout repeats the angles, c1 == c2):

    forward:   y1 = x1 c1 - x2 s1        y2 = x2 c2 + x1 s2
    backward:  dx1 = dy1 c1 + dy2 s2     dx2 = dy2 c2 - dy1 s1     (the transposed rotation)

so backward is the forward kernel with ``(s1, s2) -> (-s2, -s1)``. One program per block of
positions (of one batch row) loads their cos/sin once and rotates every query and key head there,
each a contiguous ``[positions, rot]`` slab (fully coalesced); dims past ``rot`` (partial rotary)
pass through. Any strides work as long as the last dim is contiguous,
so the ``[batch, heads, seq, head_dim]`` views out of the projections need no copy. ``cos``/``sin``
are constants of the positions: they get no gradient.
"""

import torch
from jaxtyping import Float
from torch import Tensor

from fastllm.kernels import _triton
from fastllm.kernels._triton import tl
from fastllm.kernels.registry import Choice, resolve

__all__ = ["apply_rotary", "apply_rotary_reference", "rotate_reference", "rotate_half"]


def rotate_half(x: Float[Tensor, "*batch dim"]) -> Float[Tensor, "*batch dim"]:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotate_reference(
    x: Float[Tensor, "batch heads seq head_dim"], cos: Float[Tensor, "#batch seq rot"],
    sin: Float[Tensor, "#batch seq rot"],
) -> Float[Tensor, "batch heads seq head_dim"]:
    """One tensor's rotation in torch (``fastllm.nn.rotary.apply``): the first ``rot`` dims of every
    head turn, the rest pass through (partial rotary)."""
    rot = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    turned = x[..., :rot] * cos + rotate_half(x[..., :rot]) * sin
    return torch.cat((turned, x[..., rot:]), dim=-1) if rot < x.shape[-1] else turned


def apply_rotary_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return rotate_reference(q, cos, sin), rotate_reference(k, cos, sin)


@_triton.jit
def _rotate_heads(X, Y, c1, c2, s1, s2, n_heads, sx_b, sx_h, sx_s, sy_b, sy_h, sy_s, b, tokens, half,
                  mask, ACC: tl.constexpr):
    """Rotate one [tokens, half] tile pair of every head in turn (cos/sin stay in registers)."""
    x_at = X + b * sx_b + tokens * sx_s
    y_at = Y + b * sy_b + tokens * sy_s
    for head in range(0, n_heads):
        x1 = tl.load(x_at, mask=mask, other=0.0).to(ACC)
        x2 = tl.load(x_at + half, mask=mask, other=0.0).to(ACC)
        tl.store(y_at, (x1 * c1 - x2 * s1).to(Y.dtype.element_ty), mask=mask)
        tl.store(y_at + half, (x2 * c2 + x1 * s2).to(Y.dtype.element_ty), mask=mask)
        x_at += sx_h
        y_at += sy_h


@_triton.jit
def _rotary(Q, K, QO, KO, COS, SIN, seq, half, n_q, n_k,
            sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sqo_b, sqo_h, sqo_s, sko_b, sko_h, sko_s,
            sc_b, sc_s, BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_HALF: tl.constexpr,
            ACC: tl.constexpr):
    """One program per (block of BLOCK_S positions, batch row): cos/sin loaded once, then every
    query and key head of those positions, each a contiguous [BLOCK_S, rot] slab."""
    b = tl.program_id(1).to(tl.int64)
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (tokens < seq) & (dims < half)
    angle_at = b * sc_b + tokens * sc_s + dims
    c1 = tl.load(COS + angle_at, mask=mask, other=0.0).to(ACC)
    c2 = tl.load(COS + angle_at + half, mask=mask, other=0.0).to(ACC)
    s1 = tl.load(SIN + angle_at, mask=mask, other=0.0).to(ACC)
    s2 = tl.load(SIN + angle_at + half, mask=mask, other=0.0).to(ACC)
    if BACKWARD:
        s1, s2 = -s2, -s1
    _rotate_heads(Q + dims, QO + dims, c1, c2, s1, s2, n_q, sq_b, sq_h, sq_s, sqo_b, sqo_h, sqo_s, b,
                  tokens, half, mask, ACC)
    _rotate_heads(K + dims, KO + dims, c1, c2, s1, s2, n_k, sk_b, sk_h, sk_s, sko_b, sko_h, sko_s, b,
                  tokens, half, mask, ACC)


def _check(x: Tensor, name: str) -> None:
    if x.dim() != 4 or x.stride(-1) != 1:
        raise ValueError(f"apply_rotary: {name} must be [batch, heads, seq, head_dim] with a "
                         f"contiguous last dim, got shape {tuple(x.shape)} strides {x.stride()}")


def _output(x: Tensor, rot: int, inplace: bool) -> Tensor:
    if inplace:
        return x
    out = torch.empty_like(x)
    if rot < x.shape[-1]:
        out[..., rot:] = x[..., rot:]  # partial rotary: the tail passes through
    return out


def _launch(q, k, q_out, k_out, cos, sin, backward: bool, block_s=None, num_warps=None) -> None:
    batch, n_q, seq, _ = q.shape
    half = cos.shape[-1] // 2
    cos, sin = cos.expand(batch, seq, -1), sin.expand(batch, seq, -1)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    block_half = _triton.row_block(half)
    block_s = block_s or max(1, min(_triton.row_block(seq), 2048 // block_half))  # ~4K elements
    _triton.launch(
        _rotary, (_triton.cdiv(seq, block_s), batch), q.device, q, k, q_out, k_out, cos, sin, seq, half,
        n_q, k.shape[1], q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2), cos.stride(0), cos.stride(1),
        BACKWARD=backward, BLOCK_S=block_s, BLOCK_HALF=block_half,
        ACC=_triton.accumulator(q.dtype), num_warps=num_warps or 4,
    )


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(q, k, cos, sin, inplace):
        rot = cos.shape[-1]
        q_out, k_out = _output(q, rot, inplace), _output(k, rot, inplace)
        _launch(q, k, q_out, k_out, cos, sin, backward=False)
        return q_out, k_out

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, cos, sin, inplace = inputs
        ctx.save_for_backward(cos, sin)
        if inplace:
            ctx.mark_dirty(q, k)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        return (*_triton.plain(_backward, dq, dk, cos, sin), None, None, None)


def _backward(dq, dk, cos, sin):
    rot = cos.shape[-1]
    dq = dq if dq.stride(-1) == 1 else dq.contiguous()
    dk = dk if dk.stride(-1) == 1 else dk.contiguous()
    dq_in, dk_in = _output(dq, rot, False), _output(dk, rot, False)
    _launch(dq, dk, dq_in, dk_in, cos, sin, backward=True)
    return dq_in, dk_in


def apply_rotary(
    q: Float[Tensor, "batch heads seq head_dim"],
    k: Float[Tensor, "batch kv_heads seq head_dim"],
    cos: Float[Tensor, "#batch seq rot"],
    sin: Float[Tensor, "#batch seq rot"],
    *,
    inplace: bool = False,
    impl: Choice = "auto",
) -> tuple[Float[Tensor, "batch heads seq head_dim"], Float[Tensor, "batch kv_heads seq head_dim"]]:
    """Rotate the first ``rot`` dims of every query and key head; ``inplace`` overwrites q and k."""
    _check(q, "q")
    _check(k, "k")
    if cos.shape != sin.shape or cos.shape[-1] % 2 or cos.shape[-1] > q.shape[-1]:
        raise ValueError(f"apply_rotary: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must match "
                         f"and rotate an even number of dims <= head_dim={q.shape[-1]}")
    if resolve(impl, q.device) == "torch":
        q_out, k_out = apply_rotary_reference(q, k, cos, sin)
        if inplace:
            return q.copy_(q_out), k.copy_(k_out)
        return q_out, k_out
    return _Rotary.apply(q, k, cos, sin, inplace)
