"""Multi-tensor optimizer kernels: a fused AdamW step and a fused global gradient norm.

AdamW (Loshchilov & Hutter 2019), as ``torch.optim.AdamW``, on fp32 master weights ``p`` with the
gradient ``g`` scaled by ``grad_scale`` (a device scalar, so clipping needs no host sync):

    p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps);  model copy <- p (e.g. bf16)

Hundreds of parameter tensors are updated by ONE launch (apex's multi_tensor_apply idea): the work
is cut into chunks of ``_CHUNK`` elements; a table gives each chunk its tensor and offset, and
per-role tables hold every tensor's address, which the kernel turns back into typed pointers.
The gradient norm uses the same tables: each chunk writes its partial sum of squares, one small
torch sum finishes (deterministic, no atomics).
"""

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from fastllm.kernels import _triton
from fastllm.kernels._triton import tl
from fastllm.kernels.registry import Choice, resolve

__all__ = ["adamw_step", "adamw_step_reference", "global_norm", "global_norm_reference"]

_CHUNK = 1 << 16
_BLOCK = 1024
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def adamw_step_reference(params, grads, exp_avgs, exp_avg_sqs, master, *, lr, beta1, beta2, eps,
                         weight_decay, step, grad_scale=1.0) -> None:
    """The same update with torch ops, tensor by tensor, in place."""
    master = params if master is None else master
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    for p, g, m, v, w in zip(params, grads, exp_avgs, exp_avg_sqs, master):
        g = g.to(w.dtype) * grad_scale
        w.mul_(1 - lr * weight_decay)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        w.addcdiv_(m / bias1, (v / bias2).sqrt().add_(eps), value=-lr)
        if p is not w:
            p.copy_(w)


def global_norm_reference(tensors: Sequence[Tensor]) -> Tensor:
    return torch.sqrt(sum(_triton.upcast(t).pow(2).sum() for t in tensors))


@_triton.jit
def _typed(table, index, LIKE):
    """The address ``table[index]`` as a pointer of the same type as the pointer ``LIKE``."""
    return tl.load(table + index).to(LIKE.dtype)


@_triton.jit
def _adamw(PARAMS, GRADS, MASTER, M, V, SIZES, CHUNK_TENSOR, CHUNK_START, GRAD_SCALE,
           P_LIKE, G_LIKE, W_LIKE, lr, beta1, beta2, eps, decay, bias1, bias2,
           HAS_MASTER: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    chunk = tl.program_id(0)
    tensor = tl.load(CHUNK_TENSOR + chunk)
    start = tl.load(CHUNK_START + chunk)
    size = tl.load(SIZES + tensor)
    p_ptr = _typed(PARAMS, tensor, P_LIKE)
    g_ptr = _typed(GRADS, tensor, G_LIKE)
    w_ptr = _typed(MASTER, tensor, W_LIKE)
    m_ptr = _typed(M, tensor, W_LIKE)
    v_ptr = _typed(V, tensor, W_LIKE)
    scale = tl.load(GRAD_SCALE)
    for offset in range(0, CHUNK, BLOCK):
        idx = start + offset + tl.arange(0, BLOCK)
        mask = idx < size
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32) * scale
        w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32) * decay
        m = beta1 * tl.load(m_ptr + idx, mask=mask, other=0.0) + (1.0 - beta1) * g
        v = beta2 * tl.load(v_ptr + idx, mask=mask, other=0.0) + (1.0 - beta2) * g * g
        w -= lr * (m / bias1) / (tl.sqrt(v / bias2) + eps)
        tl.store(m_ptr + idx, m.to(W_LIKE.dtype.element_ty), mask=mask)
        tl.store(v_ptr + idx, v.to(W_LIKE.dtype.element_ty), mask=mask)
        tl.store(w_ptr + idx, w.to(W_LIKE.dtype.element_ty), mask=mask)
        if HAS_MASTER:
            tl.store(p_ptr + idx, w.to(P_LIKE.dtype.element_ty), mask=mask)


@_triton.jit
def _sum_squares(TENSORS, SIZES, CHUNK_TENSOR, CHUNK_START, PARTIAL, LIKE,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    chunk = tl.program_id(0)
    tensor = tl.load(CHUNK_TENSOR + chunk)
    start = tl.load(CHUNK_START + chunk)
    size = tl.load(SIZES + tensor)
    ptr = _typed(TENSORS, tensor, LIKE)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in range(0, CHUNK, BLOCK):
        idx = start + offset + tl.arange(0, BLOCK)
        x = tl.load(ptr + idx, mask=idx < size, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(PARTIAL + chunk, tl.sum(acc, axis=0))


def _witness(tensors: Sequence[Tensor], role: str) -> Tensor:
    """A tensor of the role's one dtype: its pointer tells the kernel how to type the addresses."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _FLOATS:
        raise ValueError(f"multi-tensor kernel: all {role} need one dtype among "
                         f"{list(_FLOATS)}, got {sorted(map(str, dtypes))}")
    return tensors[0]


def _tables(device, *roles: Sequence[Tensor]):
    """(address table per role, sizes, chunk -> tensor, chunk -> start), one host->device copy."""
    sizes = [t.numel() for t in roles[0]]
    for role in roles:
        for t, n in zip(role, sizes):
            if not t.is_contiguous() or t.numel() != n or t.device != torch.device(device):
                raise ValueError("multi-tensor kernel: every tensor must be contiguous, on "
                                 f"{device}, and match its parameter's size ({n} elements)")
    chunk_tensor = [i for i, n in enumerate(sizes) for _ in range(math.ceil(n / _CHUNK))]
    chunk_start = [c * _CHUNK for n in sizes for c in range(math.ceil(n / _CHUNK))]
    rows = [[t.data_ptr() for t in role] for role in roles] + [sizes]
    packed = torch.tensor(rows, dtype=torch.int64)
    chunks = torch.tensor([chunk_tensor, chunk_start], dtype=torch.int64)
    packed, chunks = packed.to(device, non_blocking=True), chunks.to(device, non_blocking=True)
    return list(packed[:-1]), packed[-1], chunks[0], chunks[1]


def adamw_step(
    params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor], master: Optional[Sequence[Tensor]] = None, *,
    lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
    weight_decay: float = 0.0, step: int, grad_scale: Tensor | float = 1.0, impl: Choice = "auto",
) -> None:
    """One AdamW step, in place, over all tensors at once. ``master``: fp32 copies of ``params``
    (then ``params`` only receive the rounded result); moments share the master dtype."""
    if not (len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs)) or (
            master is not None and len(master) != len(params)):
        raise ValueError("adamw_step: params, grads, moments (and master) need equal lengths")
    if step < 1:
        raise ValueError(f"adamw_step: step counts from 1, got {step}")
    if not params:
        return
    if resolve(impl, params[0].device) == "torch":
        return adamw_step_reference(params, grads, exp_avgs, exp_avg_sqs, master, lr=lr, beta1=beta1,
                                    beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                                    grad_scale=grad_scale)
    weights = params if master is None else master
    device = params[0].device
    (p_t, g_t, w_t, m_t, v_t), sizes, chunk_tensor, chunk_start = _tables(
        device, params, grads, weights, exp_avgs, exp_avg_sqs)
    scale = torch.as_tensor(grad_scale, dtype=torch.float32, device=device).reshape(1)
    _triton.launch(_adamw, (chunk_tensor.numel(),), device, p_t, g_t, w_t, m_t, v_t, sizes,
                   chunk_tensor, chunk_start, scale, _witness(params, "params"), _witness(grads, "grads"),
                   _witness(list(weights) + list(exp_avgs) + list(exp_avg_sqs), "master/moments"),
                   float(lr), float(beta1), float(beta2), float(eps),
                   1.0 - lr * weight_decay, 1.0 - beta1**step, 1.0 - beta2**step, HAS_MASTER=master is not None, CHUNK=_CHUNK, BLOCK=_BLOCK, num_warps=4)


def global_norm(tensors: Sequence[Tensor], *, impl: Choice = "auto") -> Tensor:
    """``sqrt(sum of squares)`` over all tensors (fp32 accumulation), one launch."""
    if not tensors:
        raise ValueError("global_norm of no tensors")
    device = tensors[0].device
    if resolve(impl, device) == "torch":
        return global_norm_reference(tensors)
    (table,), sizes, chunk_tensor, chunk_start = _tables(device, tensors)
    partial = torch.empty(chunk_tensor.numel(), device=device, dtype=torch.float32)
    _triton.launch(_sum_squares, (partial.numel(),), device, table, sizes, chunk_tensor, chunk_start,
                   partial, _witness(tensors, "tensors"), CHUNK=_CHUNK, BLOCK=_BLOCK, num_warps=4)
    return partial.sum().sqrt()
