"""Functional, optax-style optimizers over pytrees (see docs/optim.md).

    opt = optim.adamw(optim.schedules.cosine(3e-4, total_steps=10_000, warmup_steps=200),
                      weight_decay=0.1, max_grad_norm=1.0)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    params = optim.apply_updates(params, updates)
    # or: params, state = optim.apply_gradients(opt, grads, state, params)  (fused, in place)
"""

from fastllm.optim import schedules
from fastllm.optim.alias import adam, adamw, sgd
from fastllm.optim.base import (
    EmptyState,
    GradientTransformation,
    apply_gradients,
    apply_updates,
    cast_tree,
    chain,
    get_state,
    global_norm,
    select_tree,
    state_axes,
)
from fastllm.optim.loss_scale import (
    LossScale,
    all_finite,
    dynamic_loss_scale,
    scale_loss,
    unscale_and_check,
)
from fastllm.optim.masks import decay_all, decay_mask, default_decay_mask
from fastllm.optim.transforms import (
    ClipByGlobalNormState,
    ScaleByAdamState,
    ScaleByScheduleState,
    TraceState,
    add_decayed_weights,
    clip_by_global_norm,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_path,
    scale_by_schedule,
    trace,
)

__all__ = [
    "schedules",
    "GradientTransformation",
    "EmptyState",
    "chain",
    "apply_updates",
    "apply_gradients",
    "global_norm",
    "cast_tree",
    "select_tree",
    "get_state",
    "state_axes",
    "scale",
    "scale_by_adam",
    "trace",
    "add_decayed_weights",
    "scale_by_schedule",
    "scale_by_learning_rate",
    "clip_by_global_norm",
    "scale_by_path",
    "ScaleByAdamState",
    "TraceState",
    "ScaleByScheduleState",
    "ClipByGlobalNormState",
    "adamw",
    "adam",
    "sgd",
    "decay_mask",
    "default_decay_mask",
    "decay_all",
    "LossScale",
    "dynamic_loss_scale",
    "scale_loss",
    "unscale_and_check",
    "all_finite",
]
