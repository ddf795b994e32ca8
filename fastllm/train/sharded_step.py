"""The distributed train step: the single-process step of :mod:`fastllm.train.step` on local shards.

Each data rank takes its own rows of the batch; each micro-batch's mean loss is weighted by its
share of the valid target tokens of the *global* batch (all data ranks), so the gradients summed
over ``data`` are the gradient of the global mean loss, as one process computes it:

    grad = sum_ranks sum_i (n_i / N) grad(loss_i),     N = sum over ranks and micro-batches of n_i

Then (see fastllm/sharding/zero.py) the gradients are reduced into the gradient layout of the ZeRO
stage, clipped by their global norm over all shards, and the functional optimizer updates the
shards it owns (the storage blocks from stage 1 on), whose new values are gathered back into the
compute layout (stages 1 and 2). Clipping belongs to the step, not the optimizer: the optimizer's
``clip_by_global_norm`` would see one rank's shards only.

This is training code on top of :mod:`fastllm.sharding` (partitioner, ZeRO collectives); sharding
itself never imports ``fastllm.train`` or ``fastllm.models``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fastllm import models, optim, random, tree
from fastllm.sharding import zero
from fastllm.sharding.partitioner import Partitioner
from fastllm.sharding.prefetch import PrefetchGather
from fastllm.train.state import TrainState
from fastllm.train.step import COMPUTE_DTYPES, _gradients, block_fn_for, split_micro_batches, target_weight

__all__ = ["ShardedTrainStep", "make_sharded_train_step", "make_sharded_eval_step", "init_sharded_state"]

Batch = dict[str, Tensor]


def _sum_over(value: Tensor, axis: str, partitioner: Partitioner) -> Tensor:
    mesh = partitioner.mesh
    if mesh.size(axis) == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, group=mesh.group(axis))
    return value


def _opt_view(partitioner: Partitioner, values: Any, data_dims: dict) -> Any:
    """The blocks the optimizer owns: storage slices at stages 1-2 (stage 3 stores only those)."""
    if partitioner.zero_stage in (1, 2):
        return zero.to_storage(values, data_dims, partitioner.mesh)
    return values


def init_sharded_state(
    config, partitioner: Partitioner, optimizer: optim.GradientTransformation, key: random.Key
) -> TrainState:
    """This rank's train state: its parameter shards and the optimizer state of the blocks it owns
    (keys derived from ``key`` as the single-process Trainer derives them)."""
    specs = models.param_specs(config)
    plan = partitioner.plan(specs)
    params = partitioner.init_params(specs, random.fold_in(key, "params"))
    opt_state = optimizer.init(_opt_view(partitioner, params, plan.data_dims))
    return TrainState(params, opt_state, 0, random.fold_in(key, "train"), None)


class ShardedTrainStep:
    """``step(state, batch) -> (state, metrics)`` on this rank's shards; ``batch`` holds this data
    rank's rows (``[micro_batch_size * grad_accum, seq]``), the same on every tensor rank. The step
    donates ``state`` (the fused optimizer writes the new params and moments into its tensors)
    unless ``donate=False``, which runs the optimizer's pure chain instead."""

    def __init__(
        self,
        config,
        partitioner: Partitioner,
        optimizer: optim.GradientTransformation,
        *,
        grad_accum: int = 1,
        precision: Literal["fp32", "bf16"] = "fp32",
        max_grad_norm: Optional[float] = None,
        learning_rate: Callable[[int], float] | None = None,
        remat: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        donate: bool = True,
    ):
        if precision not in ("fp32", "bf16"):
            raise NotImplementedError(f"precision {precision!r} under a mesh: use fp32 or bf16 "
                                      "(fp16 loss scaling is not sharded yet)")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.config, self.partitioner, self.optimizer = config, partitioner, optimizer
        self.grad_accum, self.dtype = grad_accum, COMPUTE_DTYPES[precision]
        self.max_grad_norm, self.learning_rate, self.remat = max_grad_norm, learning_rate, remat
        self.donate = donate
        self.block_fn = block_fn_for(compile, compile_backend)  # fastllm.train.compile: gathers stay eager
        self.plan = partitioner.plan(models.param_specs(config))
        self.layout = partitioner.layout(self.plan.declarations)
        gather = self.layout.gather
        self._gather = gather if isinstance(gather, PrefetchGather) else None  # ZeRO-3, overlapped
        self.overlap_stats: dict[str, int] = {}  # of the last step (fastllm.sharding.overlap)

    def gradients(self, state: TrainState, batch: Batch) -> tuple[Any, Tensor, Tensor]:
        """(gradients in the stage's gradient layout, global mean loss, global valid tokens)."""
        p, mesh = self.partitioner, self.partitioner.mesh
        micro_batches = split_micro_batches(batch, self.grad_accum)
        tokens = _sum_over(sum(target_weight(m) for m in micro_batches), "data", p)

        if p.overlap:
            grads, loss_sum = self._overlapped_gradients(state.params, micro_batches, tokens)
            return grads, _sum_over(loss_sum, "data", p), tokens

        def loss_fn(params, micro):
            return models.loss(self.config, params, micro, layout=self.layout, remat=self.remat,
                               block_fn=self.block_fn)

        grads, loss_sum = _gradients(loss_fn, state.params, micro_batches, self.dtype, None, total_weight=tokens)
        grads = zero.reduce_gradients(
            grads, zero_stage=p.zero_stage, data_dims=self.plan.data_dims,
            compute_specs=self.plan.flat_compute, mesh=mesh, sequence_parallel=p.sequence_parallel,
            dtype=p.reduce_dtype, limit_bytes=p.bucket_bytes,
        )
        return grads, _sum_over(loss_sum, "data", p), tokens

    def _overlapped_gradients(self, params: Any, micro_batches: list[Batch], tokens: Tensor) -> tuple[Any, Tensor]:
        """As :func:`fastllm.train.step._gradients` followed by the reduction, but the reduction runs
        during the last micro-batch's backward (earlier ones accumulate locally) and ZeRO-3 gathers
        are prefetched: see fastllm/sharding/overlap.py."""
        masters = tree.map(lambda t: t.detach().requires_grad_(True), params)
        reduction = self.partitioner.gradient_reduction(self.plan, masters, self.layout)
        total = tokens.clamp(min=1.0)
        loss_sum = torch.zeros((), dtype=torch.float32, device=tree.leaves(params)[0].device)
        for index, micro in enumerate(micro_batches):
            if self._gather is not None:  # ZeRO-3: the blocks peers gather from (p2p's shadow) or a cast
                compute = self._gather.compute_params(masters, self.dtype, refill=index == 0, sources=params)
            else:
                compute = optim.cast_tree(masters, self.dtype)
            with reduction.micro_batch(compute, last=index == len(micro_batches) - 1):
                loss, _ = models.loss(self.config, compute, micro, layout=self.layout, remat=self.remat,
                                      block_fn=self.block_fn)
                share = target_weight(micro) / total
                reduction.backward(loss.float() * share, remat=self.remat)
            loss_sum = loss_sum + loss.detach().float() * share
        grads = reduction.finish()
        self.overlap_stats = reduction.stats
        return grads, loss_sum

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Tensor]]:
        if state.loss_scale is not None:
            raise NotImplementedError("fp16 loss scaling is not supported under a mesh yet")
        p = self.partitioner
        if p.mesh.world_size > 1 and optim.get_state(state.opt_state, optim.ClipByGlobalNormState):
            raise ValueError("the optimizer clips by global norm, which on shards sees one rank's "
                             "part only: build it without clipping and pass max_grad_norm to the step")
        grads, loss, tokens = self.gradients(state, batch)
        grads = _opt_view(p, grads, self.plan.data_dims) if p.zero_stage == 1 else grads
        owned = _opt_view(p, state.params, self.plan.data_dims)
        grad_norm = zero.global_norm(grads, self.plan.opt_state, p.mesh)
        factor = None
        if self.max_grad_norm is not None:  # torch's clip_grad_norm_ factor, applied to the gradients
            factor = torch.clamp(self.max_grad_norm / (grad_norm + 1e-6), max=1.0)
        if self.donate:  # fused AdamW when it can: `owned` (the params or slices) and the moments in place
            # ... and, under the copy-engine transport, their compute-dtype copy that ZeRO-3 gathers
            # from, in the same pass (the next step then skips its master -> compute cast)
            rounded = self._gather.rounded_copies(owned) if self._gather is not None else None
            owned, opt_state = optim.apply_gradients(self.optimizer, grads, state.opt_state, owned,
                                                     kernels=self.config.kernels, grad_scale=factor,
                                                     rounded=rounded)
            if rounded is not None:
                self._gather.rounded_written(owned)
        else:  # the pure chain: the input state stays as it was
            grads = grads if factor is None else tree.map(lambda g: g * factor, grads)
            updates, opt_state = self.optimizer.update(grads, state.opt_state, owned)
            owned = optim.apply_updates(owned, updates)
        if p.zero_stage in (1, 2):
            params = zero.to_compute(owned, self.plan.data_dims, p.mesh, p.bucket_bytes)
        else:
            params = owned
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": tokens}
        if self.learning_rate is not None:
            metrics["lr"] = torch.tensor(float(self.learning_rate(state.step)))
        return TrainState(params, opt_state, state.step + 1, state.key, None), metrics


def make_sharded_train_step(config, partitioner: Partitioner, optimizer, **options) -> ShardedTrainStep:
    """:class:`ShardedTrainStep` (options: ``grad_accum``, ``precision``, ``max_grad_norm``,
    ``learning_rate``, ``remat``, ``compile``, ``compile_backend``, ``donate``)."""
    return ShardedTrainStep(config, partitioner, optimizer, **options)


def make_sharded_eval_step(config, partitioner: Partitioner, *, precision: Literal["fp32", "bf16"] = "fp32"):
    """``eval_step(params, batch) -> {"loss", "tokens"}`` over the global batch (all data ranks),
    without gradients; ``params`` and ``batch`` as for :class:`ShardedTrainStep`."""
    dtype, layout = COMPUTE_DTYPES[precision], partitioner.layout(models.param_specs(config))

    def eval_step(params: Any, batch: Batch) -> dict[str, Tensor]:
        with torch.no_grad():
            loss, _ = models.loss(config, optim.cast_tree(params, dtype), batch, layout=layout)
        tokens = target_weight(batch)
        total = _sum_over(tokens, "data", partitioner)
        loss = _sum_over(loss.float() * tokens, "data", partitioner) / total.clamp(min=1.0)
        return {"loss": loss, "tokens": total}

    return eval_step
