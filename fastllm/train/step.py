"""Pure training and evaluation steps.

``train_step(state, batch) -> (state, metrics)``: the batch (``[micro_batch_size * grad_accum,
seq]`` tensors) is split into ``grad_accum`` micro-batches; each runs forward and backward on the
parameters cast to the compute dtype, and its gradient is weighted by its share of the valid
target tokens, so the accumulated gradient is the gradient of the mean loss over the whole batch:

    grad = sum_i (n_i / N) * grad(loss_i)        (n_i valid targets of micro-batch i, N = sum n_i)

Gradients land on the fp32 master weights (the cast is differentiable) and the optimizer state is
fp32. The update goes through :func:`fastllm.optim.apply_gradients`: an optimizer with a fused
kernel (``optim.adamw``) writes the new params and moments into the input state's tensors (the
step consumes its input state unless ``donate=False``). With fp16 the loss is multiplied by a
dynamic scale before backward and the update is skipped (via ``torch.where``, no host sync) when a
gradient overflows (Micikevicius et al. 2018).
Metrics are 0-d tensors; reading them is the caller's (the Trainer's) choice of sync point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from fastllm import models, optim, tree
from fastllm.models.config import ModelConfig
from fastllm.nn.loss import IGNORE_INDEX
from fastllm.train.state import TrainState

__all__ = ["COMPUTE_DTYPES", "make_train_step", "make_eval_step", "split_micro_batches", "target_weight",
           "block_fn_for"]

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Batch = dict[str, Tensor]


def target_weight(batch: Batch) -> Tensor:
    """Total weight of the valid targets of a batch (the ``N`` above), as a float32 0-d tensor."""
    weight = (batch["targets"] != IGNORE_INDEX).float()
    if batch.get("loss_mask") is not None:
        weight = weight * batch["loss_mask"].float()
    return weight.sum()


def split_micro_batches(batch: Batch, count: int) -> list[Batch]:
    """``count`` micro-batches along the batch dimension (which ``count`` must divide)."""
    rows = batch["tokens"].shape[0]
    if rows % count:
        raise ValueError(f"batch of {rows} sequences does not split into grad_accum={count} micro-batches")
    chunks = {name: value.chunk(count, dim=0) for name, value in batch.items() if value is not None}
    return [{name: parts[i] for name, parts in chunks.items()} for i in range(count)]


def _loss_fn(config: ModelConfig, remat: str, block_fn=None) -> Callable[[Any, Batch], tuple[Tensor, dict]]:
    return lambda params, batch: models.loss(config, params, batch, remat=remat == "block", block_fn=block_fn)


def block_fn_for(compile: bool, backend: str = "inductor"):
    """The ``block_fn`` of :func:`fastllm.models.loss`: ``None`` (eager) or one
    :class:`~fastllm.train.compile.CompiledBlocks` for the step's every block and micro-batch."""
    if not compile:
        return None
    from fastllm.train.compile import CompiledBlocks  # imports the compiler stack only when asked

    return CompiledBlocks(backend)


def _gradients(loss_fn, params, micro_batches: list[Batch], dtype, loss_scale, total_weight=None):
    """(sum of weighted fp32 gradients, weighted mean loss) over the micro-batches.

    ``total_weight`` (default: the micro-batches' own) is the ``N`` of the formula above; the
    sharded step passes the valid targets of every data rank."""
    masters = tree.map(lambda p: p.detach().requires_grad_(True), params)
    leaves = tree.leaves(masters)
    if total_weight is None:
        total_weight = sum(target_weight(m) for m in micro_batches)
    total_weight = total_weight.clamp(min=1.0)
    grads = [torch.zeros_like(p) for p in leaves]
    loss_sum = torch.zeros((), dtype=torch.float32, device=leaves[0].device)
    for micro in micro_batches:
        loss, _ = loss_fn(optim.cast_tree(masters, dtype), micro)
        share = target_weight(micro) / total_weight
        scaled = loss.float() * share * (1.0 if loss_scale is None else loss_scale)
        micro_grads = torch.autograd.grad(scaled, leaves, allow_unused=True)
        for acc, g in zip(grads, micro_grads):
            if g is not None:
                acc.add_(g)
        loss_sum = loss_sum + loss.detach().float() * share
    return tree.with_leaves(params, grads), loss_sum


def _grad_norm(grads, opt_state) -> Tensor:
    """The global gradient norm: the one the clipping transform just computed, if it clips."""
    clip = optim.get_state(opt_state, optim.ClipByGlobalNormState)
    return optim.global_norm(grads) if clip is None else clip.norm


def make_train_step(
    config: ModelConfig,
    optimizer: optim.GradientTransformation,
    *,
    grad_accum: int = 1,
    precision: Literal["fp32", "bf16", "fp16"] = "fp32",
    remat: Literal["none", "block"] = "none",
    learning_rate: Callable[[int], float] | None = None,
    compile: bool = False,
    compile_backend: str = "inductor",
    donate: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Tensor]]]:
    """The step for a model and optimizer; ``learning_rate(step)`` is only reported.

    ``compile``: each decoder block runs through ``torch.compile`` (``compile_backend``), see
    :mod:`fastllm.train.compile`; same loss and gradients up to rounding. ``donate``: the step may
    write the new params and optimizer moments into the input state's tensors (the optimizer's
    fused path, one kernel pass); ``False`` keeps the input state intact (the unfused chain, a pure
    step). With fp16 loss scaling the step is always pure: a skipped step keeps the old params."""
    dtype = COMPUTE_DTYPES[precision]
    loss_fn = _loss_fn(config, remat, block_fn_for(compile, compile_backend))

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Tensor]]:
        micro_batches = split_micro_batches(batch, grad_accum)
        loss_scale = state.loss_scale
        scale = None if loss_scale is None else loss_scale.scale
        grads, loss = _gradients(loss_fn, state.params, micro_batches, dtype, scale)
        if loss_scale is not None:
            grads, finite, loss_scale = optim.unscale_and_check(grads, loss_scale)
        if loss_scale is None and donate:  # fused when the optimizer has a kernel for it: in place
            params, opt_state = optim.apply_gradients(optimizer, grads, state.opt_state, state.params,
                                                      kernels=config.kernels)
        else:
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optim.apply_updates(state.params, updates)
        grad_norm = _grad_norm(grads, opt_state)
        if loss_scale is not None:  # an overflowing fp16 step changes nothing but the scale
            params, opt_state = optim.select_tree(finite, (params, opt_state), (state.params, state.opt_state))
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": target_weight(batch)}
        if learning_rate is not None:
            metrics["lr"] = torch.tensor(float(learning_rate(state.step)))
        if loss_scale is not None:
            metrics["loss_scale"] = loss_scale.scale
        new_state = TrainState(params, opt_state, state.step + 1, state.key, loss_scale)
        return new_state, metrics

    return train_step


def make_eval_step(
    config: ModelConfig, *, precision: Literal["fp32", "bf16", "fp16"] = "fp32"
) -> Callable[[Any, Batch], dict[str, Tensor]]:
    """``eval_step(params, batch) -> {"loss", "tokens"}`` without gradients, in the compute dtype."""
    dtype = COMPUTE_DTYPES[precision]

    def eval_step(params: Any, batch: Batch) -> dict[str, Tensor]:
        with torch.no_grad():
            loss, _ = models.loss(config, optim.cast_tree(params, dtype), batch)
        return {"loss": loss.float(), "tokens": target_weight(batch)}

    return eval_step
