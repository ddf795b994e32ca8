"""The optimizer a config asks for: AdamW with warmup and a decay schedule, optional clipping."""

from __future__ import annotations

from fastllm import optim
from fastllm.optim.schedules import Schedule

__all__ = ["learning_rate_schedule", "build_optimizer"]


def learning_rate_schedule(config) -> Schedule:
    """``config.optim``'s schedule over ``config.train.steps`` optimizer steps."""
    o, total = config.optim, config.train.steps
    if o.schedule == "cosine":
        return optim.schedules.cosine(o.lr, total, o.warmup_steps, o.min_lr_ratio)
    if o.schedule == "linear":
        return optim.schedules.linear_decay(o.lr, total, o.warmup_steps, o.min_lr_ratio)
    return optim.schedules.warmup_constant(o.lr, o.warmup_steps)


def build_optimizer(config, *, clip: bool = True) -> tuple[optim.GradientTransformation, Schedule]:
    """(AdamW over fp32 masters, its learning-rate schedule) for a :class:`fastllm.train.Config`.

    ``clip=False`` leaves out gradient clipping (a sharded step clips over all shards itself)."""
    o = config.optim
    schedule = learning_rate_schedule(config)
    transform = optim.adamw(
        schedule, b1=o.betas[0], b2=o.betas[1], eps=o.eps, weight_decay=o.weight_decay,
        max_grad_norm=config.train.grad_clip if clip else None,
    )
    return transform, schedule
