"""Dynamic loss scaling for fp16 training (Micikevicius et al. 2018, "Mixed Precision Training").

The loss is multiplied by ``scale`` before backward so small fp16 gradients do not underflow; the
gradients are divided by it afterwards. A step whose gradients hold an inf/NaN is skipped and the
scale shrinks by ``backoff_factor``; after ``growth_interval`` finite steps in a row it grows by
``growth_factor``. Everything is tensor arithmetic: no host sync.

    state = dynamic_loss_scale()
    grads = grad_fn(params)  # of scale_loss(loss, state)
    grads, finite, state = unscale_and_check(grads, state)
    new_params, new_opt = ...optimizer step...
    params, opt_state = select_tree(finite, (new_params, new_opt), (params, opt_state))

bf16 training does not need this (bf16 has fp32's exponent range).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Optional

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from fastllm import tree
from fastllm.tree import PyTree

__all__ = ["LossScale", "dynamic_loss_scale", "scale_loss", "unscale_and_check", "all_finite"]


class LossScale(NamedTuple):
    scale: Tensor  # 0-d fp32
    good_steps: Tensor  # 0-d int64: finite steps since the last change of scale
    growth_interval: int = 2000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    min_scale: float = 1.0


def dynamic_loss_scale(
    initial: float = 2.0**16,
    growth_interval: int = 2000,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    min_scale: float = 1.0,
    device: Optional[torch.device] = None,
) -> LossScale:
    if not (initial > 0 and growth_factor >= 1 and 0 < backoff_factor < 1 and growth_interval >= 1):
        raise ValueError("dynamic_loss_scale: need initial > 0, growth_factor >= 1, "
                         f"0 < backoff_factor < 1, growth_interval >= 1; got {initial}, "
                         f"{growth_factor}, {backoff_factor}, {growth_interval}")
    return LossScale(
        torch.tensor(float(initial), dtype=torch.float32, device=device),
        torch.zeros((), dtype=torch.int64, device=device),
        int(growth_interval), float(growth_factor), float(backoff_factor), float(min_scale),
    )


def scale_loss(loss: Float[Tensor, ""], state: LossScale) -> Float[Tensor, ""]:
    return loss * state.scale.to(loss.dtype)


def all_finite(values: PyTree) -> Bool[Tensor, ""]:
    """True when no leaf holds an inf or NaN (a 0-d bool tensor, no host sync)."""
    checks = [torch.isfinite(x).all() for x in tree.leaves(values)]
    return torch.stack(checks).all() if checks else torch.tensor(True)


def unscale_and_check(
    grads: PyTree, state: LossScale, *, agree: Optional[Callable[[Tensor], Tensor]] = None
) -> tuple[PyTree, Bool[Tensor, ""], LossScale]:
    """(fp32 gradients divided by the scale, whether all are finite, the updated scale state).

    With sharded gradients pass ``agree``: it receives this rank's verdict (a 0-d bool tensor) and
    returns every rank's combined (e.g. a MIN all-reduce), so all ranks skip the same steps."""
    inverse = 1.0 / state.scale
    unscaled = tree.map(lambda g: g.float() * inverse, grads)
    finite = all_finite(unscaled)
    if agree is not None:
        finite = agree(finite)
    good = torch.where(finite, state.good_steps + 1, torch.zeros_like(state.good_steps))
    grow = good >= state.growth_interval
    grown = torch.where(grow, state.scale * state.growth_factor, state.scale)
    shrunk = torch.clamp(state.scale * state.backoff_factor, min=state.min_scale)
    new_state = state._replace(
        scale=torch.where(finite, grown, shrunk),
        good_steps=torch.where(grow, torch.zeros_like(good), good),
    )
    return unscaled, finite, new_state
