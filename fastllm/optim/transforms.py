"""The building blocks: each returns a :class:`~fastllm.optim.base.GradientTransformation`.

Adam (Kingma & Ba 2015) with decoupled weight decay (AdamW, Loshchilov & Hutter 2019):

    m_t = b1 m_{t-1} + (1 - b1) g_t        v_t = b2 v_{t-1} + (1 - b2) g_t^2
    u_t = (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)
    delta_t = -lr_t (u_t + wd * p_{t-1})

Step counters are 0-d int64 tensors in the state (on the params' device), and every scalar that
depends on them (bias corrections, scheduled learning rates, clipping factors) is a 0-d tensor too:
``update`` never reads a value back to the host, and under ``torch.compile`` the step is data, not
a constant, so the graph compiles once.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor

from fastllm import tree
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


def scale(factor: float) -> GradientTransformation:
    """Multiply every update by a constant."""

    def update(updates, state, params=None):
        return tree.map(lambda u: u * factor, updates), state

    return GradientTransformation(lambda params: EmptyState(), update)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's direction ``m_hat / (sqrt(v_hat) + eps)``, moments kept in fp32."""
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"scale_by_adam: betas must be in [0, 1), got b1={b1}, b2={b2}")
    if not eps >= 0:
        raise ValueError(f"scale_by_adam: eps must be >= 0, got {eps}")

    def init(params):
        return ScaleByAdamState(_counter(params), _fp32_zeros(params), _fp32_zeros(params))

    def update(updates, state, params=None):
        mu = tree.map(lambda m, g: m.lerp(g.float(), 1 - b1), state.mu, updates)
        nu = tree.map(lambda v, g: v * b2 + (1 - b2) * g.float().square(), state.nu, updates)
        count = state.count + 1
        t = count.to(torch.float64)  # bias corrections in float64: 1 - 0.999 loses bits in fp32
        correction1 = 1 - b1**t
        root_correction2 = (1 - b2**t).sqrt()
        direction = tree.map(
            lambda m, v: (m / correction1) / (v.sqrt() / root_correction2 + eps), mu, nu
        )
        return direction, ScaleByAdamState(count, mu, nu)

    return GradientTransformation(init, update)


def trace(decay: float, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum ``b = decay * b + g`` (``g + decay * b`` with Nesterov), as torch SGD."""

    def init(params):
        return TraceState(_fp32_zeros(params))

    def update(updates, state, params=None):
        buffer = tree.map(lambda b, g: b * decay + g.float(), state.trace, updates)
        if nesterov:
            out = tree.map(lambda g, b: g.float() + decay * b, updates, buffer)
        else:
            out = buffer
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
        return tree.map_with_path(
            lambda path, u, p: u + weight_decay * p.float() if mask(path, p) else u, updates, params
        ), state

    return GradientTransformation(lambda params: EmptyState(), update)


def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """Multiply the updates by ``schedule(count)``; ``count`` is the number of earlier updates."""

    def init(params):
        return ScaleByScheduleState(_counter(params))

    def update(updates, state, params=None):
        factor = torch.as_tensor(schedule(state.count), dtype=torch.float32)
        new = tree.map(lambda u: u * factor, updates)
        return new, ScaleByScheduleState(state.count + 1)

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
        return tree.map(lambda u: u * factor.to(u.dtype), updates), ClipByGlobalNormState(norm)

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
