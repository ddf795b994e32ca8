"""Ready-made optimizers: chains of the transforms in :mod:`fastllm.optim.transforms`."""

from __future__ import annotations

from typing import Optional, Union

from fastllm.optim.base import GradientTransformation, chain
from fastllm.optim.fused import fused_adamw
from fastllm.optim.masks import Mask, default_decay_mask
from fastllm.optim.schedules import Schedule
from fastllm.optim.transforms import (
    add_decayed_weights,
    clip_by_global_norm,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)

__all__ = ["adamw", "adam", "sgd"]

LearningRate = Union[float, Schedule]


def adamw(
    learning_rate: LearningRate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    mask: Mask = default_decay_mask,
    max_grad_norm: Optional[float] = None,
) -> GradientTransformation:
    """AdamW = chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate).

    The decay is scaled by the (scheduled) learning rate, as in ``torch.optim.AdamW``. Unlike torch,
    only ``mask``-selected leaves decay (default: matrices, not embeddings/norms/biases; pass
    ``fastllm.optim.decay_all`` for torch's behaviour). ``max_grad_norm`` prepends
    ``clip_by_global_norm``. The transformation carries a ``fused`` step (one multi-tensor kernel
    pass, in place) that :func:`~fastllm.optim.apply_gradients` uses: see :mod:`fastllm.optim.fused`.
    """
    transforms = [
        scale_by_adam(b1, b2, eps),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    ]
    if max_grad_norm is not None:
        transforms.insert(0, clip_by_global_norm(max_grad_norm))
    fused = fused_adamw(learning_rate, b1, b2, eps, weight_decay, mask, max_grad_norm)
    return chain(*transforms)._replace(fused=fused)


def adam(
    learning_rate: LearningRate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> GradientTransformation:
    return chain(scale_by_adam(b1, b2, eps), scale_by_learning_rate(learning_rate))


def sgd(
    learning_rate: LearningRate,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    mask: Mask = default_decay_mask,
) -> GradientTransformation:
    """SGD as ``torch.optim.SGD`` (dampening 0): L2 decay is added to the gradient before momentum."""
    if nesterov and momentum <= 0:
        raise ValueError("sgd: nesterov needs momentum > 0")
    transforms = [add_decayed_weights(weight_decay, mask)] if weight_decay else []
    if momentum:
        transforms.append(trace(momentum, nesterov))
    transforms.append(scale_by_learning_rate(learning_rate))
    return chain(*transforms)
