"""One train step and one eval step, for every model and every layout (one device is a mesh of one).

``step(state, batch) -> (state, metrics)``: ``batch`` holds this data rank's rows
(``[micro_batch_size * grad_accum, seq]``, the same on every rank of the other axes), split into
``grad_accum`` micro-batches. Each runs the model's parts (:func:`fastllm.nn.run`) on the
parameters cast to the compute dtype, with its loss weighted by its share of the valid target
tokens of the *global* batch, so the gradients summed over the data ranks are the gradient of the
global mean loss, as one process computes it:

    grad = sum_ranks sum_i (n_i / N) grad(loss_i),     N = sum over ranks and micro-batches of n_i

Per part the step gathers ZeRO-3 parameters (prefetching the next part), recomputes the repeated
parts in backward (``remat``) and runs them compiled (``compile``); gradients are reduced as
backward goes (:class:`fastllm.sharding.overlap.GradientReduction`), clipped by their global norm
over every shard, and the functional optimizer updates the blocks this rank owns (its storage
blocks from ZeRO stage 1 on), gathered back into the compute layout at stages 1 and 2. With fp16
the loss is multiplied by a dynamic scale and a step whose gradients overflow anywhere is skipped
on every rank (``torch.where``, no host sync; Micikevicius et al. 2018). Any step whose loss or
gradient norm is not finite is skipped the same way (params and optimizer state, counters included,
keep their values) and flagged in the metrics as ``nonfinite``.

On one device every collective is the identity and none of this costs anything: the same code.
There, with one micro-batch in bf16, the step differentiates a compute copy that the optimizer
keeps up to date in its own pass instead of casting the masters (:mod:`fastllm.train.compute_copy`).
Metrics are 0-d tensors; reading them is the caller's (the Trainer's) choice of sync point.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fastllm import nn, optim, random, tree
from fastllm.nn.loss import IGNORE_INDEX
from fastllm.sharding import pipeline, zero
from fastllm.sharding.partitioner import Partitioner, Plan
from fastllm.train.compute_copy import ComputeCopy, keeps_copy
from fastllm.train.pipeline import PipelineExecutor, sum_over_stages
from fastllm.train.state import TrainState

__all__ = ["COMPUTE_DTYPES", "TrainStep", "EvalStep", "split_micro_batches", "target_weight"]

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Batch = dict[str, Tensor]


def target_weight(batch: Batch) -> Tensor:
    """Total weight of the valid targets of a batch (the ``n`` above), as a float32 0-d tensor."""
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


def _sum_over(value: Tensor, axis: str, partitioner: Partitioner) -> Tensor:
    mesh = partitioner.mesh
    if mesh.size(axis) == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, group=mesh.group(axis))
    return value


class _Runner:
    """Runs one part of a model inside a step: its ZeRO-3 gather, recomputation and compilation."""

    def __init__(self, gather, remat: bool, compiled):
        self.gather, self.remat, self.compiled = gather, remat, compiled

    def __call__(self, flat: Optional[dict], index: int, part: nn.Part, params: Any, carry: dict,
                 batch: Batch, layout) -> dict:
        def body(carry: dict) -> dict:  # under remat this runs again in backward: gather included
            subtrees = self.subtrees(flat, index, part, params)
            fn = self.compiled(part) if self.compiled is not None and part.layer is not None else part.fn
            return fn(part.static, subtrees, carry, batch, layout)

        if self.remat and part.layer is not None:
            return checkpoint(body, carry, use_reentrant=False)
        return body(carry)

    def subtrees(self, flat: Optional[dict], index: int, part: nn.Part, params: Any) -> tuple:
        if self.gather is None:
            return nn.model.part_params(part, params)
        gathered = self.gather.gathered(index, flat)
        out = []
        for keys in part.params:
            prefix = tree.dotted(keys)
            out.append(tree.map_with_path(lambda sub, x: gathered.get(f"{prefix}.{sub}" if sub else prefix, x),
                                          tree.get(params, keys)))
        return tuple(out)


def _device(state: TrainState) -> torch.device:
    return next(t.device for t in tree.leaves(state.params))


def _pipeline(model: nn.Model, plan: Plan, partitioner: Partitioner, dtype: torch.dtype):
    """The executor of this rank's pipeline actions, when the mesh has a ``pipe`` axis."""
    if partitioner.mesh.size("pipe") == 1:
        return None
    return PipelineExecutor(model, plan, partitioner.mesh, partitioner.rules, dtype)


def _compiled_parts(compile: bool, backend: str):
    if not compile:
        return None
    from fastllm.train.compile import CompiledParts  # imports the compiler stack only when asked

    return CompiledParts(backend)


class TrainStep:
    """``step(state, batch) -> (state, metrics)`` for ``model`` under ``partitioner`` (module docstring).

    ``optimizer`` must not clip by global norm when there are several ranks (it would see one
    rank's shards): pass ``max_grad_norm`` to the step instead. ``donate`` (default): the fused
    optimizer writes the new params and moments into the input state's tensors; ``False`` runs
    the optimizer's pure chain and keeps the input state intact (fp16 always does). ``remat``:
    recompute the repeated parts' activations in backward; ``compile``: run them through
    ``torch.compile`` (``compile_backend``); both change no value beyond rounding."""

    def __init__(
        self,
        model: nn.Model,
        partitioner: Partitioner,
        optimizer: optim.GradientTransformation,
        *,
        grad_accum: int = 1,
        precision: Literal["fp32", "bf16", "fp16"] = "fp32",
        max_grad_norm: Optional[float] = None,
        learning_rate: Callable[[int], float] | None = None,
        remat: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        donate: bool = True,
        schedule: str = "1f1b",
    ):
        if precision not in COMPUTE_DTYPES:
            raise ValueError(f"precision must be one of {sorted(COMPUTE_DTYPES)}, got {precision!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        self.model, self.partitioner, self.optimizer = model, partitioner, optimizer
        self.grad_accum, self.dtype, self.precision = grad_accum, COMPUTE_DTYPES[precision], precision
        self.max_grad_norm, self.learning_rate, self.remat, self.donate = max_grad_norm, learning_rate, remat, donate
        self.plan: Plan = partitioner.plan(model)
        self.layout = partitioner.layout()
        self.gather = partitioner.gather(self.plan)
        self.runner = _Runner(self.gather, remat, _compiled_parts(compile, compile_backend))
        self.overlap_stats: dict[str, int] = {}  # of the last step (fastllm.sharding.overlap)
        self.schedule = schedule
        self.pipeline = _pipeline(model, self.plan, partitioner, self.dtype)
        # one device, one micro-batch, bf16: the masters' gradient is the compute copy's, widened
        # (fastllm.train.compute_copy), so the copy is differentiated and kept from step to step
        kept = keeps_copy(precision, grad_accum, partitioner.mesh.world_size, donate)
        self.compute_copy = ComputeCopy(self.dtype) if kept else None
        if self.pipeline is not None:  # checked now: a schedule that cannot run is an error at build time
            pipeline.schedule(schedule, partitioner.mesh.size("pipe"), grad_accum, partitioner.virtual_stages)

    # --- state ---------------------------------------------------------------------------------
    def init_state(self, key: random.Key, *, loss_scale: Optional[optim.LossScale] = None) -> TrainState:
        """This rank's train state: its parameter shards (drawn from ``fold_in(key, "params")``) and
        the optimizer state of the blocks it owns."""
        params = self.partitioner.init_params(self.model, random.fold_in(key, "params"))
        opt_state = self.optimizer.init(self._owned(params))
        return TrainState(params, opt_state, 0, random.fold_in(key, "train"), loss_scale)

    def _owned(self, values: Any) -> Any:
        """The blocks the optimizer owns: storage slices at stages 1-2 (stage 3 stores only those)."""
        if self.partitioner.zero_stage in (1, 2):
            return zero.to_storage(values, self.plan.data_dims, self.partitioner.mesh)
        return values

    # --- gradients -----------------------------------------------------------------------------
    def gradients(self, state: TrainState, batch: Batch) -> tuple[Any, Tensor, Tensor]:
        """(gradients in the stage's gradient layout, global mean loss, global valid tokens); with
        fp16 the gradients are still multiplied by the loss scale."""
        p = self.partitioner
        micro_batches = split_micro_batches(batch, self.grad_accum)
        tokens = _sum_over(sum(target_weight(m) for m in micro_batches), "data", p)
        if self.pipeline is not None:
            return self._pipeline_gradients(state, micro_batches, tokens)
        # the leaves differentiated: the masters, or the kept compute copy (its cast below is a no-op)
        leaves = state.params if self.compute_copy is None else self.compute_copy.of(state.params)
        masters = tree.map(lambda t: t.detach().requires_grad_(True), leaves)
        reduction = p.gradient_reduction(self.plan, tree.flatten(masters), self.gather)
        total = tokens.clamp(min=1.0)
        scale = 1.0 if state.loss_scale is None else state.loss_scale.scale
        loss_sum = torch.zeros((), dtype=torch.float32, device=tree.leaves(state.params)[0].device)
        for index, micro in enumerate(micro_batches):
            compute = (self.gather.compute_params(masters, self.dtype, refill=index == 0) if self.gather is not None
                       else optim.cast_tree(masters, self.dtype))
            flat = tree.flatten(compute)
            with reduction.micro_batch(flat, last=index == len(micro_batches) - 1):
                carry = nn.run(self.model, compute, micro, layout=self.layout, call=partial(self.runner, flat))
                share = target_weight(micro) / total
                reduction.backward(carry["loss"].float() * share * scale, remat=self.remat)
            loss_sum = loss_sum + carry["loss"].detach().float() * share
        grads = reduction.finish()
        self.overlap_stats = reduction.stats
        return tree.with_leaves(state.params, list(grads.values())), _sum_over(loss_sum, "data", p), tokens

    def _pipeline_gradients(self, state: TrainState, micro_batches: list[Batch], tokens: Tensor):
        """:meth:`gradients` through this rank's actions of the pipeline schedule: every micro-batch's
        chunks run as the schedule orders them, gradients accumulate, then they are reduced."""
        p, mesh = self.partitioner, self.partitioner.mesh
        masters = tree.map(lambda t: t.detach().requires_grad_(True), state.params)
        reduction = p.gradient_reduction(self.plan, tree.flatten(masters), self.gather)
        compute = (self.gather.compute_params(masters, self.dtype) if self.gather is not None
                   else optim.cast_tree(masters, self.dtype))
        flat, total = tree.flatten(compute), tokens.clamp(min=1.0)
        scale = 1.0 if state.loss_scale is None else state.loss_scale.scale
        actions = pipeline.schedule(self.schedule, mesh.size("pipe"), len(micro_batches),
                                    p.virtual_stages)[mesh.rank("pipe")]

        def weight(m: int, loss: Tensor) -> Tensor:
            return loss.float() * (target_weight(micro_batches[m]) / total) * scale

        def call(index, part, params, carry, batch):
            return self.runner(flat, index, part, params, carry, batch, self.layout)

        with reduction.micro_batch(flat, last=True):
            weighted = self.pipeline.run(actions, micro_batches, compute, call, weight, _device(state))
        grads = sum_over_stages(reduction.finish(), self.plan.stages_of, mesh)
        self.overlap_stats = reduction.stats
        loss = _sum_over(_sum_over(weighted / scale, "pipe", p), "data", p)  # the last stage holds it
        return tree.with_leaves(state.params, list(grads.values())), loss, tokens

    # --- the step ------------------------------------------------------------------------------
    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Tensor]]:
        p = self.partitioner
        if p.mesh.world_size > 1 and optim.get_state(state.opt_state, optim.ClipByGlobalNormState):
            raise ValueError("the optimizer clips by global norm, which on shards sees one rank's part "
                             "only: build it without clipping and pass max_grad_norm to the step")
        grads, loss, tokens = self.gradients(state, batch)
        grads = self._owned(grads) if p.zero_stage == 1 else grads
        loss_scale, finite = state.loss_scale, None
        if loss_scale is not None:
            grads, finite, loss_scale = optim.unscale_and_check(grads, loss_scale, agree=self._agree)
        grad_norm = zero.global_norm(grads, self.plan.opt_state, p.mesh,
                                     self.plan.stages_of if self.pipeline is not None else None)
        nonfinite, apply = _verdict(loss, grad_norm, finite)
        factor = None
        if self.max_grad_norm is not None:  # torch's clip_grad_norm_ factor, applied to the gradients
            factor = torch.clamp(self.max_grad_norm / (grad_norm + 1e-6), max=1.0)
        owned = self._owned(state.params)
        if self.donate and loss_scale is None:  # fused (AdamW) when it can: params and moments in place
            copy = None if self.compute_copy is None else self.compute_copy.copy
            owned, opt_state = optim.apply_gradients(self.optimizer, grads, state.opt_state, owned,
                                                     kernels=getattr(self.model.config, "kernels", None),
                                                     grad_scale=factor, apply=apply, model_copy=copy)
            if copy is not None:
                self.compute_copy.written(owned)
        else:  # the pure chain: the input state stays as it was, and a skipped step keeps it
            grads = grads if factor is None else tree.map(lambda g: g * factor, grads)
            updates, opt_state = self.optimizer.update(grads, state.opt_state, owned)
            new = optim.apply_updates(owned, updates)
            owned, opt_state = optim.select_tree(apply, (new, opt_state), (owned, state.opt_state))
        params = self._compute_layout(owned)
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": tokens, "nonfinite": nonfinite}
        if self.learning_rate is not None:
            metrics["lr"] = torch.tensor(float(self.learning_rate(state.step)))
        if loss_scale is not None:
            metrics["loss_scale"] = loss_scale.scale
        return TrainState(params, opt_state, state.step + 1, state.key, loss_scale), metrics

    def _compute_layout(self, owned: Any) -> Any:
        if self.partitioner.zero_stage not in (1, 2):
            return owned
        return zero.to_compute(owned, self.plan.data_dims, self.partitioner.mesh, self.partitioner.bucket_bytes)

    def _agree(self, finite: Tensor) -> Tensor:
        """Every rank's fp16 overflow verdict combined: a step is skipped everywhere or nowhere."""
        if self.partitioner.mesh.world_size == 1:
            return finite
        flag = finite.to(torch.float32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return flag > 0


def _verdict(loss: Tensor, grad_norm: Tensor, fp16_finite: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(a non-finite step: skipped and counted, whether to apply the update), as 0-d device bools.

    Every rank reaches the same verdict without a collective of its own: the loss is summed over
    the data ranks and the norm over every shard of the world, so a NaN anywhere is a NaN in both.
    Under fp16 loss scaling an overflowing gradient is the scaler's business (it skips the step and
    shrinks the scale); only a non-finite loss counts as a bad step there."""
    loss_ok = torch.isfinite(loss)
    if fp16_finite is not None:
        return ~loss_ok, loss_ok & fp16_finite
    ok = loss_ok & torch.isfinite(grad_norm)
    return ~ok, ok


class EvalStep:
    """``eval_step(params, batch) -> {"loss", "tokens"}`` over the global batch (every data rank),
    without gradients, in the compute dtype; ``params`` and ``batch`` as for :class:`TrainStep`."""

    def __init__(self, model: nn.Model, partitioner: Partitioner, *,
                 precision: Literal["fp32", "bf16", "fp16"] = "fp32"):
        self.model, self.partitioner, self.dtype = model, partitioner, COMPUTE_DTYPES[precision]
        self.plan = partitioner.plan(model)
        self.layout = partitioner.layout()
        self.gather = partitioner.gather(self.plan)
        self.runner = _Runner(self.gather, False, None)
        self.pipeline = _pipeline(model, self.plan, partitioner, self.dtype)

    def __call__(self, params: Any, batch: Batch) -> dict[str, Tensor]:
        with torch.no_grad():
            compute = optim.cast_tree(params, self.dtype)
            flat = tree.flatten(compute)
            if self.gather is not None:
                self.gather.bind(flat, None)
            try:
                loss = self._loss(compute, flat, batch)
            finally:
                if self.gather is not None:
                    self.gather.release()
        tokens = target_weight(batch)
        total = _sum_over(tokens, "data", self.partitioner)
        loss = _sum_over(_sum_over(loss * tokens, "pipe", self.partitioner), "data", self.partitioner)
        return {"loss": loss / total.clamp(min=1.0), "tokens": total}

    def _loss(self, compute: Any, flat: dict, batch: Batch) -> Tensor:
        """This rank's loss (under a pipeline, the last stage's; zero on the others)."""
        if self.pipeline is None:
            return nn.run(self.model, compute, batch, layout=self.layout, call=partial(self.runner, flat))["loss"].float()
        mesh = self.partitioner.mesh
        mine = [c for c in range(self.plan.chunks) if c % mesh.size("pipe") == mesh.rank("pipe")]
        carry = self.pipeline.forward_only(mine, batch, compute, lambda index, part, params, carry, b: self.runner(
            flat, index, part, params, carry, b, self.layout), batch["tokens"].device)
        return carry["loss"].float() if carry is not None else torch.zeros((), device=batch["tokens"].device)
