"""The building blocks: each returns a :class:`~fastllm.optim.base.GradientTransformation`.

Adam (Kingma & Ba 2015) with decoupled weight decay (AdamW, Loshchilov & Hutter 2019):

    m_t = b1 m_{t-1} + (1 - b1) g_t        v_t = b2 v_{t-1} + (1 - b2) g_t^2
    u_t = (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)
    delta_t = -lr_t (u_t + wd * p_{t-1})

The arithmetic runs on whole lists of leaves at once: ``torch._foreach_*`` ops in eager mode (one
kernel for many tensors, as ``torch.optim``'s foreach path; a GPT-2 has ~200 leaves and per-leaf
ops are launch-bound), per-leaf ops under ``torch.compile`` where inductor fuses them (see
``_multi``). All ops are out of place: states are new tensors.

Step counters are 0-d int64 tensors in the state (on the params' device), and every scalar that
depends on them (bias corrections, scheduled learning rates, clipping factors) is a 0-d tensor too:
``update`` never reads a value back to the host, and under ``torch.compile`` the step is data, not
a constant, so the graph compiles once.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Union

import optree
import torch
from torch import Tensor

from fastllm import tree
from fastllm.optim import _multi
from fastllm.optim.base import EmptyState, GradientTransformation, Reduce, global_norm
from fastllm.optim.masks import Mask, default_decay_mask
from fastllm.optim.schedules import Schedule

__all__ = [
    "ScaleByAdamState",
    "TraceState",
    "ScaleByScheduleState",
    "ClipByGlobalNormState",
    "scale",
    "scale_by_adam",
    "trace",
    "add_decayed_weights",
    "scale_by_schedule",
    "scale_by_learning_rate",
    "clip_by_global_norm",
    "scale_by_path",
]


class ScaleByAdamState(NamedTuple):
    count: Tensor  # 0-d int64: updates applied so far
    mu: Any  # first moments, fp32, params-shaped
    nu: Any  # second moments, fp32, params-shaped


class TraceState(NamedTuple):
    trace: Any  # momentum buffer, fp32, params-shaped


class ScaleByScheduleState(NamedTuple):
    count: Tensor  # 0-d int64


class ClipByGlobalNormState(NamedTuple):
    norm: Tensor  # 0-d fp32: the global norm of the last update *before* clipping


def _device(params) -> torch.device:
    leaves = [x for x in tree.leaves(params) if isinstance(x, Tensor)]
    return leaves[0].device if leaves else torch.device("cpu")


def _counter(params) -> Tensor:
    return torch.zeros((), dtype=torch.int64, device=_device(params))


def _fp32_zeros(params):
    return tree.map(lambda p: torch.zeros_like(p, dtype=torch.float32), params)


def _fp32(tensors: list) -> list:
    return [t if t.dtype == torch.float32 else t.float() for t in tensors]


def _over_leaves(fn: Callable[..., tuple], updates, *trees) -> tuple:
    """``fn(update_leaves, *leaves_of_trees)`` returns lists of leaves; each becomes a tree shaped
    like ``updates`` (an empty tree passes through: foreach ops refuse empty lists)."""
    leaves, spec = optree.tree_flatten(updates)
    if not leaves:
        return (updates,) * (1 + len(trees))
    results = fn(leaves, *(tree.leaves(t) for t in trees))
    return tuple(optree.tree_unflatten(spec, list(r)) for r in results)


def scale(factor: float) -> GradientTransformation:
    """Multiply every update by a constant."""

    def update(updates, state, params=None):
        (scaled,) = _over_leaves(lambda u: (_multi.mul(u, factor),), updates)
        return scaled, state

    return GradientTransformation(lambda params: EmptyState(), update)


def _adam(g, m, v, b1, b2, eps, correction1, root_correction2) -> tuple:
    """(direction, new m, new v) over lists of leaves. Module level, not nested in ``update``: a
    ``def`` run inside a compiled region would be re-decorated by the typecheck hook."""
    g = _fp32(g)
    m = torch._foreach_lerp(m, g, 1 - b1)  # b1 m + (1 - b1) g
    v = torch._foreach_mul(v, b2)
    torch._foreach_addcmul_(v, g, g, value=1 - b2)  # b2 v + (1 - b2) g^2
    denominator = torch._foreach_sqrt(v)
    torch._foreach_div_(denominator, root_correction2)
    torch._foreach_add_(denominator, eps)  # sqrt(v_hat) + eps
    direction = torch._foreach_div(m, denominator)
    torch._foreach_div_(direction, correction1)  # m_hat / (sqrt(v_hat) + eps)
    return direction, m, v


def _adam_leafwise(g, m, v, b1, b2, eps, correction1, root_correction2) -> tuple:
    """:func:`_adam` leaf by leaf: under ``torch.compile`` inductor fuses each leaf's chain of
    pointwise ops into one kernel, which beats the horizontally fused foreach ops there."""
    directions, ms, vs = [], [], []
    for g_leaf, m_leaf, v_leaf in zip(_fp32(g), m, v):
        m_leaf = m_leaf.lerp(g_leaf, 1 - b1)
        v_leaf = v_leaf * b2 + (1 - b2) * g_leaf * g_leaf
        directions.append((m_leaf / correction1) / (v_leaf.sqrt() / root_correction2 + eps))
        ms.append(m_leaf)
        vs.append(v_leaf)
    return directions, ms, vs


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's direction ``m_hat / (sqrt(v_hat) + eps)``, moments kept in fp32."""
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"scale_by_adam: betas must be in [0, 1), got b1={b1}, b2={b2}")
    if not eps >= 0:
        raise ValueError(f"scale_by_adam: eps must be >= 0, got {eps}")

    def init(params):
        return ScaleByAdamState(_counter(params), _fp32_zeros(params), _fp32_zeros(params))

    def update(updates, state, params=None):
        count = state.count + 1
        t = count.to(torch.float64)  # bias corrections in float64: 1 - 0.999 loses bits in fp32
        correction1 = 1 - b1**t
        root_correction2 = (1 - b2**t).sqrt()

        adam = _adam_leafwise if torch.compiler.is_compiling() else _adam
        direction, mu, nu = _over_leaves(
            lambda g, m, v: adam(g, m, v, b1, b2, eps, correction1, root_correction2),
            updates, state.mu, state.nu,
        )
        return direction, ScaleByAdamState(count, mu, nu)

    return GradientTransformation(init, update)


def trace(decay: float, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum ``b = decay * b + g`` (``g + decay * b`` with Nesterov), as torch SGD."""

    def init(params):
        return TraceState(_fp32_zeros(params))

    def momentum(g, b):
        g = _fp32(g)
        b = _multi.add(g, b, alpha=decay)  # g + decay * b
        return (_multi.add(g, b, alpha=decay) if nesterov else b), b

    def update(updates, state, params=None):
        out, buffer = _over_leaves(momentum, updates, state.trace)
        return out, TraceState(buffer)

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay: float, mask: Mask = default_decay_mask) -> GradientTransformation:
    """``u + weight_decay * p`` where ``mask(path, p)`` holds (see :mod:`fastllm.optim.masks`)."""
    if not weight_decay >= 0:
        raise ValueError(f"add_decayed_weights: weight_decay must be >= 0, got {weight_decay}")

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(grads, state, params)")
        if weight_decay == 0:
            return updates, state
        leaves, spec = optree.tree_flatten(updates)
        chosen = [(i, p) for i, (path, p) in enumerate(tree.leaves_with_path(params)) if mask(path, p)]
        if not chosen:
            return updates, state
        decayed = _multi.add(
            _fp32([leaves[i] for i, _ in chosen]), _fp32([p for _, p in chosen]), alpha=weight_decay
        )
        for (i, _), value in zip(chosen, decayed):
            leaves[i] = value
        return optree.tree_unflatten(spec, leaves), state

    return GradientTransformation(lambda params: EmptyState(), update)


def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """Multiply the updates by ``schedule(count)``; ``count`` is the number of earlier updates."""

    def init(params):
        return ScaleByScheduleState(_counter(params))

    def update(updates, state, params=None):
        factor = torch.as_tensor(schedule(state.count), dtype=torch.float32)
        (scaled,) = _over_leaves(lambda u: (_multi.mul(u, factor),), updates)
        return scaled, ScaleByScheduleState(state.count + 1)

    return GradientTransformation(init, update)


def scale_by_learning_rate(learning_rate: Union[float, Schedule]) -> GradientTransformation:
    """Multiply by ``-learning_rate`` (a float or a schedule): gradients become descent deltas."""
    if callable(learning_rate):
        return scale_by_schedule(lambda step: -learning_rate(step))
    return scale(-float(learning_rate))


def clip_by_global_norm(max_norm: float, reduce: Reduce = None) -> GradientTransformation:
    """Rescale the updates so their global norm is at most ``max_norm``.

    Same factor as ``torch.nn.utils.clip_grad_norm_``: ``min(1, max_norm / (norm + 1e-6))``. The
    pre-clip norm is kept in the state (``get_state(state, ClipByGlobalNormState).norm``) for logging.
    ``reduce`` sums the squared norm across shards (see :func:`~fastllm.optim.base.global_norm`).
    """
    if not max_norm > 0:
        raise ValueError(f"clip_by_global_norm: max_norm must be > 0, got {max_norm}")

    def init(params):
        return ClipByGlobalNormState(torch.zeros((), dtype=torch.float32, device=_device(params)))

    def update(updates, state, params=None):
        norm = global_norm(updates, reduce)
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        (clipped,) = _over_leaves(lambda u: (_multi.mul(u, factor),), updates)
        return clipped, ClipByGlobalNormState(norm)

    return GradientTransformation(init, update)


def scale_by_path(
    rules: Union[Mapping[str, float], Sequence[tuple[str, float]]],
) -> GradientTransformation:
    """Per-parameter multipliers: ``rules`` maps glob patterns on dotted paths to factors.

    The first matching pattern wins (``fnmatch`` syntax: ``*`` matches across dots); unmatched
    leaves keep factor 1. ``init`` rejects a pattern that matches no parameter (a likely typo).
    Put it before ``scale_by_learning_rate`` to scale the learning rate per parameter, e.g.
    ``{"embed.*": 0.1, "*.router": 0.5}``.
    """
    pairs = list(rules.items()) if isinstance(rules, Mapping) else [tuple(r) for r in rules]

    def factor(path: str) -> float:
        for pattern, multiplier in pairs:
            if fnmatch.fnmatchcase(path, pattern):
                return float(multiplier)
        return 1.0

    def init(params):
        paths = [path for path, _ in tree.leaves_with_path(params)]
        for pattern, _ in pairs:
            if not any(fnmatch.fnmatchcase(path, pattern) for path in paths):
                raise ValueError(f"scale_by_path: pattern {pattern!r} matches no parameter "
                                 f"(paths look like {paths[:3]})")
        return EmptyState()

    def update(updates, state, params=None):
        return tree.map_with_path(
            lambda path, u: u if factor(path) == 1.0 else u * factor(path), updates
        ), state

    return GradientTransformation(init, update)
