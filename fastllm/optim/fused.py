"""``optim.adamw`` as one fused multi-tensor pass: the ``fused`` field of its transformation.

The chain ``[clip_by_global_norm,] scale_by_adam, add_decayed_weights, scale_by_learning_rate``
followed by ``apply_updates`` reads and writes every leaf several times (hundreds of foreach
launches on a large model). The fused path computes the same step (Loshchilov & Hutter 2019):

    c = min(1, max_norm / (||g|| + 1e-6))   (only with max_grad_norm; ||g|| over every leaf)
    m <- b1 m + (1 - b1) c g;   v <- b2 v + (1 - b2) (c g)^2
    p <- p (1 - lr_t wd) - lr_t (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

with ``kernels.global_norm`` and ``kernels.adamw_step`` (decayed and non-decayed leaves: two
launches), writing params and moments in place, and with ``model_copy`` the new params rounded to
the compute dtype in the same pass (the next forward reads them: no separate cast). ``lr_t``, ``t``
and ``c`` stay 0-d device tensors. The returned state is the chain's, leaf for leaf: the same
NamedTuples, counters advanced the same way, the pre-clip norm in ``ClipByGlobalNormState``. Leaves
the kernel cannot take (non-fp32 params or moments, mixed gradient dtypes, non-contiguous tensors,
several devices, one tensor at two leaves) and tracing under ``torch.compile`` return ``None``:
the caller runs the chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import optree
import torch
from torch import Tensor

from fastllm import tree
from fastllm.kernels.optim import adamw_step, global_norm
from fastllm.kernels.registry import KernelConfig, select
from fastllm.optim.masks import Mask
from fastllm.optim.transforms import ClipByGlobalNormState, ScaleByAdamState, ScaleByScheduleState
from fastllm.tree import PyTree

__all__ = ["fused_adamw"]


def _fusable(params: list, grads: list, mu: list, nu: list) -> bool:
    """Whether the kernel takes these leaves as they are (else the chain must run)."""
    if torch.compiler.is_compiling():  # the kernel takes raw addresses: nothing dynamo can trace
        return False
    if not params or not len(params) == len(grads) == len(mu) == len(nu):
        return False
    if not all(isinstance(t, Tensor) for group in (params, grads, mu, nu) for t in group):
        return False
    if len({p.data_ptr() for p in params}) != len(params):  # a tensor twice would be stepped twice
        return False
    device, grad_dtype = params[0].device, grads[0].dtype
    if not grad_dtype.is_floating_point:
        return False
    for p, g, m, v in zip(params, grads, mu, nu):
        if g.dtype != grad_dtype or g.shape != p.shape or m.shape != p.shape or v.shape != p.shape:
            return False
        for t in (p, g, m, v):
            if t.device != device or not t.is_contiguous():
                return False
        if not p.dtype == m.dtype == v.dtype == torch.float32:
            return False
    return True


def _copies_fit(copies: list, params: list) -> bool:
    """Whether the kernel can write these model copies: one float dtype, shaped and placed like
    their params, contiguous."""
    if len(copies) != len(params) or not all(isinstance(c, Tensor) for c in copies):
        return False
    return len({c.dtype for c in copies}) == 1 and all(
        c.dtype.is_floating_point and c.shape == p.shape and c.device == p.device and c.is_contiguous()
        for c, p in zip(copies, params))


def _learning_rate(learning_rate, schedule_state) -> float | Tensor:
    """The step's learning rate, rounded to fp32 as ``scale_by_schedule`` rounds it."""
    if not callable(learning_rate):
        return float(learning_rate)
    value = learning_rate(schedule_state.count)
    return value.to(torch.float32) if isinstance(value, Tensor) else value


def _clip_factor(grads: list, max_grad_norm: float, grad_scale: Optional[Tensor],
                 impl: str) -> tuple[Tensor, Tensor]:
    """(factor for the gradients, pre-clip norm): ``clip_by_global_norm``'s, of ``grad_scale * g``."""
    norm = global_norm(grads, impl=impl).to(torch.float32).reshape(())
    if grad_scale is not None:
        norm = norm * grad_scale.abs()
    factor = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
    return (factor if grad_scale is None else factor * grad_scale), norm


def _adamw_by_decay(leaves: tuple[list, ...], copies: Optional[list], decays: list[bool], weight_decay: float,
                    **hyper) -> None:
    """``kernels.adamw_step`` on (params, grads, m, v) leaves: one launch for the decayed ones, one
    for the rest (weight decay is a scalar of the kernel). ``copies``: the params' narrower model
    copies, which the same pass writes (the kernel's ``params``, with ours as its fp32 ``master``)."""
    for decay, rate in ((True, weight_decay), (False, 0.0)):
        chosen = [i for i, d in enumerate(decays) if d == decay]
        if not chosen:
            continue
        params, grads, mu, nu = ([role[i] for i in chosen] for role in leaves)
        if copies is None:
            adamw_step(params, grads, mu, nu, weight_decay=rate, **hyper)
        else:
            adamw_step([copies[i] for i in chosen], grads, mu, nu, params, weight_decay=rate, **hyper)


def fused_adamw(
    learning_rate: float | Callable,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    mask: Mask,
    max_grad_norm: Optional[float],
) -> Callable[..., Optional[tuple[PyTree, Any]]]:
    """The ``fused`` function of ``optim.adamw`` with these arguments (see the module docstring)."""
    clips = max_grad_norm is not None

    def fused(grads, state, params, *, kernels: Optional[KernelConfig] = None, grad_scale: Optional[Tensor] = None,
              apply: Optional[Tensor] = None, model_copy: Optional[PyTree] = None):
        if not isinstance(state, tuple) or len(state) != 3 + clips:
            raise ValueError(f"adamw (fused): expected the adamw chain's state ({3 + clips} parts), got "
                             f"{type(state).__name__} {state!r:.80}")
        adam, decay_state, schedule_state = state[clips:]
        p_leaves, spec = optree.tree_flatten(params)
        leaves = (p_leaves, tree.leaves(grads), tree.leaves(adam.mu), tree.leaves(adam.nu))
        copies = None if model_copy is None else tree.leaves(model_copy)
        if optree.tree_structure(grads) != spec or not _fusable(*leaves) or (
                copies is not None and not _copies_fit(copies, p_leaves)):
            return None
        device = p_leaves[0].device
        scale, clip_state = grad_scale, ()
        if clips:
            scale, norm = _clip_factor(leaves[1], max_grad_norm, grad_scale, select(kernels, "grad_norm", device))
            clip_state = (ClipByGlobalNormState(norm),)
        count = adam.count + 1
        # a skipped step (``apply`` False) leaves the counters too: the state is exactly the old one
        kept = count if apply is None else adam.count + apply.to(adam.count.dtype)
        decays = [weight_decay > 0 and mask(path, p) for path, p in tree.leaves_with_path(params)]
        with torch.no_grad():  # params may be autograd leaves: this is the optimizer's own write
            _adamw_by_decay(leaves, copies, decays, weight_decay,
                            lr=_learning_rate(learning_rate, schedule_state),
                            beta1=b1, beta2=b2, eps=eps, step=count, grad_scale=1.0 if scale is None else scale,
                            apply=apply, impl=select(kernels, "adamw", device))
        if callable(learning_rate):
            schedule_state = ScaleByScheduleState(schedule_state.count + (kept - adam.count))
        return params, (*clip_state, ScaleByAdamState(kept, adam.mu, adam.nu), decay_state, schedule_state)

    return fused
