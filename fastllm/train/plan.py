"""Plan a config's layout without processes or memory: the partition plan of its model on an
abstract mesh of the config's size, and a dry run of one micro-batch on ``meta`` tensors that
records every collective the layout's operations would run (forward and backward) and every
tensor autograd saves for the backward (the activations), part by part.

    report = plan_layout(config)          # raises, naming the problem, for a layout that cannot run
    print(report)                          # per-rank memory and the collectives of one micro-batch

Activations are measured, not modelled: the forward runs on ``meta`` parameters that require
gradients, under :func:`torch.autograd.graph.saved_tensors_hooks`, and each storage autograd keeps
is counted once (views and tensors saved by several operations share one). Recomputation
(``train.remat=block``) keeps only each block's input and recomputes one block at a time in the
backward, which the per-part numbers give (:meth:`Activations.bytes`).

CI plans every shipped recipe this way (tests/train/test_recipes.py), so a recipe whose layout the
partitioner refuses fails there, not on a cluster.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import torch

from fastllm import nn, tree
from fastllm.sharding import Mesh, MeshLayout, pipeline
from fastllm.sharding.describe import Description
from fastllm.sharding.partitioner import Plan
from fastllm.sharding.placement import Collective
from fastllm.sharding.spec import is_spec, local_shape
from fastllm.train.config import Config
from fastllm.train.step import COMPUTE_DTYPES
from fastllm.train.trainer import default_model, partitioner_from_config

__all__ = ["LayoutReport", "Activations", "PartActivations", "plan_layout"]


@dataclass(frozen=True)
class PartActivations:
    """What one part of the model leaves for the backward, on one rank, for one micro-batch."""

    name: str
    repeated: bool  # a block (recomputed under remat), not the embedding or the head
    saved_bytes: int  # storages autograd saves while the part runs (first saved here)
    input_bytes: int  # the carry entering the part (what remat keeps of a block)
    largest_bytes: int  # the largest single saved storage


@dataclass(frozen=True)
class Activations:
    """The parts' saved tensors, and the backward's peak they make.

    The backward runs the parts in reverse. While part ``p``'s backward runs, the saved tensors of
    ``p`` and of every earlier part are alive (with recomputation: the earlier blocks' inputs only,
    and ``p``'s saved tensors recomputed), plus the gradient of ``p``'s output and the gradient of
    its largest saved tensor being formed. The peak is the largest of these phases."""

    parts: tuple[PartActivations, ...]
    # Micro-batches whose activations a pipeline rank holds at once, in units of all its parts: the
    # schedule's peak of forwards not yet backwarded on rank 0, over its virtual stages (1: no pipe).
    in_flight: float = 1.0

    def _kept(self, remat: bool) -> int:
        """What one micro-batch leaves for the backward through all the parts."""
        return sum(q.input_bytes if remat and q.repeated else q.saved_bytes for q in self.parts)

    def _phases(self, remat: bool) -> list[tuple[int, int]]:
        """(saved bytes alive, working bytes) while each part's backward runs."""
        phases, others = [], round((self.in_flight - 1) * self._kept(remat))  # the other micro-batches in flight
        for i, part in enumerate(self.parts):
            earlier = self.parts[:i]
            if remat:
                alive = sum(q.input_bytes if q.repeated else q.saved_bytes for q in earlier)
                alive += part.saved_bytes + (part.input_bytes if part.repeated else 0)
            else:
                alive = sum(q.saved_bytes for q in earlier) + part.saved_bytes
            alive += others
            grad_out = self.parts[i + 1].input_bytes if i + 1 < len(self.parts) else 0
            phases.append((alive, grad_out + part.largest_bytes))
        return phases or [(0, 0)]

    def bytes(self, remat: bool) -> int:
        """Saved activation bytes alive at the backward's peak."""
        return max(self._phases(remat), key=sum)[0]

    def peak_bytes(self, remat: bool) -> int:
        """Activations plus the backward's working buffers at its peak."""
        return max(sum(phase) for phase in self._phases(remat))


@dataclass(frozen=True)
class LayoutReport:
    """What one rank of a config's layout holds and moves."""

    mesh: Mesh
    plan: Plan
    description: Description  # per-rank bytes of params, gradients and optimizer state
    micro_batch_size: int
    grad_accum: int
    collectives: tuple[Collective, ...]  # of the operations in one micro-batch, forward and backward
    activations: Activations  # saved for the backward of one micro-batch, part by part
    timeline: Optional[pipeline.Timeline] = None  # the pipeline schedule of one step, when pipe > 1
    pipe_sends: int = 0  # bytes rank 0 sends its pipeline neighbours per micro-batch (carries and their gradients)

    def traffic(self) -> dict[tuple[str, str], int]:
        """Bytes per (collective, mesh axis) over one micro-batch's operations."""
        total: Counter = Counter()
        for c in self.collectives:
            total[c.kind, c.axis] += c.bytes
        return dict(total)

    def __str__(self) -> str:
        lines = [str(self.description), f"micro-batch {self.micro_batch_size} x {self.grad_accum} per step on each "
                 f"data rank; the operations of one micro-batch move:"]
        for (kind, axis), nbytes in sorted(self.traffic().items()):
            count = sum(1 for c in self.collectives if (c.kind, c.axis) == (kind, axis))
            lines.append(f"  {kind:<15} over {axis:<7} {count:5d} times, {nbytes / 2**20:12,.1f} MiB")
        if not self.collectives:
            lines.append("  nothing: every operation is local")
        if self.timeline is not None:
            lines += ["pipeline schedule (F/B chunk.micro-batch, a backward costing two forwards):", str(self.timeline)]
        return "\n".join(lines)


def _meta_params(plan: Plan, mesh: Mesh, dtype: torch.dtype) -> Any:
    """This rank's compute shards of every parameter, as ``meta`` tensors (shapes only)."""
    specs = tree.flatten(plan.compute, is_leaf=is_spec)
    return tree.map_with_path(lambda path, p: torch.empty(local_shape(p.shape, specs[path], mesh, name=path),
                                                          dtype=dtype, device="meta"),
                              plan.declarations, is_leaf=nn.is_param)


class SavedTensors:
    """Counts the storages autograd saves, once each, charged to the part running when first saved.

    Used as ``call`` of :func:`fastllm.nn.run`; works on ``meta`` tensors as on real ones."""

    def __init__(self, params: Any):
        self.seen = {self._key(t) for t in tree.leaves(params)}  # weights are not activations
        self.keep: list = []  # the storages, alive so that no key is reused during the run
        self.parts: list[PartActivations] = []
        self._saved = self._largest = 0

    @staticmethod
    def _key(tensor: torch.Tensor) -> int:
        return tensor.untyped_storage()._cdata  # one per storage, on meta tensors too

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = self._key(tensor)
        if key not in self.seen:
            storage = tensor.untyped_storage()
            self.seen.add(key)
            self.keep.append(storage)
            self._saved += storage.nbytes()
            self._largest = max(self._largest, storage.nbytes())
        return tensor

    def __call__(self, index: int, part: nn.Part, params: Any, carry: dict, batch: dict, layout) -> dict:
        self._saved = self._largest = 0
        entering = sum(t.untyped_storage().nbytes() for t in carry.values() if isinstance(t, torch.Tensor))
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            out = part.fn(part.static, nn.model.part_params(part, params), carry, batch, layout)
        self.parts.append(PartActivations(part.name, part.layer is not None, self._saved, entering, self._largest))
        return out


class _FusedAttention(torch.overrides.TorchFunctionMode):
    """Attention saves what the fused kernels save, ``q, k, v``, the output and its row
    log-sum-exp, not the ``[seq, seq]`` probabilities that ``meta`` tensors' math path keeps. Both
    devices fuse: a GPU runs FlashAttention (FlexAttention with masks), a CPU PyTorch's flash
    kernel, masks included."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            return _FlashSaved.apply(*args[:3])
        return func(*args, **kwargs)


class _FlashSaved(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # the dry run never runs a backward
        raise NotImplementedError


def dry_batch(micro: int, seq_len: int, device: str | torch.device = "meta",
              documents: bool = True) -> dict[str, torch.Tensor]:
    """A micro-batch of token ids (zeros) of the shape one forward takes (``documents``: with
    segment ids, as ``data.document_attention`` sends them)."""
    tokens = torch.zeros((micro, seq_len), dtype=torch.long, device=device)
    return {"tokens": tokens, "targets": tokens, **({"segment_ids": tokens} if documents else {})}


# Ops whose Triton kernels run on meta tensors: their outputs are allocated before the launch, which
# does nothing on meta. (MoE's dispatch sizes depend on the routing; attention is _FusedAttention's.)
GPU_KERNELS = ("rms_norm", "layer_norm", "rotary", "activation", "cross_entropy")


def planning_model(config: Config, target: str) -> nn.Model:
    """The config's built-in model with the kernels ``target`` runs: the Triton ones a GPU picks
    ("auto" on CUDA), or the torch references a CPU runs."""
    from fastllm import models
    from fastllm.kernels import _triton
    from fastllm.kernels.registry import KernelConfig

    model_config = config.model_config
    if target == "cuda" and _triton.available():
        kernels = model_config.kernels or KernelConfig()
        model_config = model_config.replace(kernels=kernels.replace(
            **{op: "triton" for op in GPU_KERNELS if getattr(kernels, op) == "auto"}))
    return default_model(config) if model_config is config.model_config else models.model(model_config)


def plan_layout(config: Config, model: Optional[nn.Model] = None, *, target: str = "cuda") -> LayoutReport:
    """The layout of ``config`` (and ``model``, default the config's built-in model) on an abstract
    mesh of ``config.mesh``'s size, seen from rank 0 (every rank holds as much). ``target``: whose
    kernels the activations are counted for: a GPU's (``"cuda"``: the Triton kernels of
    ``GPU_KERNELS`` and fused attention) or a CPU's (``"cpu"``: the torch references, and PyTorch's
    CPU flash attention). A recipe's own ``model`` runs as it is."""
    m = config.mesh
    mesh = Mesh.abstract(data=m.data, tensor=m.tensor, pipe=m.pipe)
    model = planning_model(config, target) if model is None else model
    partitioner = partitioner_from_config(config, mesh)
    plan = partitioner.plan(model)
    micro, accum = config.train.micro_batch(m.data), config.train.grad_accum(m.data)
    trace: list[Collective] = []
    params = tree.map(lambda t: t.requires_grad_(True), _meta_params(plan, mesh, COMPUTE_DTYPES[config.train.precision]))
    saved = SavedTensors(params)
    # the step's own layout: none when every operation is local (one rank, or data ranks only)
    layout = None if partitioner.layout() is None else MeshLayout(mesh, partitioner.rules, trace=trace)
    traced: list[tuple[int, int]] = []  # each part's span of the trace

    def call(index, part, params, carry, batch, layout):
        start = len(trace)
        out = saved(index, part, params, carry, batch, layout)
        traced.append((start, len(trace)))
        return out

    sample = dry_batch(micro, config.data.seq_len, documents=config.data.document_attention)
    with _FusedAttention():
        nn.run(model, params, sample, layout=layout, call=call)
    if m.pipe == 1:
        return LayoutReport(mesh, plan, partitioner.describe(model), micro, accum, tuple(trace),
                            Activations(tuple(saved.parts)))
    # Every part ran (the carry has to flow through them); rank 0 keeps its own stage's figures.
    actions = pipeline.schedule(config.pipe.schedule, m.pipe, accum, config.pipe.virtual_stages)
    mine = [i for i, part in enumerate(plan.parts) if part.stage == 0]
    trace = [c for i in mine for c in trace[slice(*traced[i])]]
    activations = Activations(tuple(saved.parts[i] for i in mine), _in_flight(actions[0]) / config.pipe.virtual_stages)
    return LayoutReport(mesh, plan, partitioner.describe(model), micro, accum, tuple(trace), activations,
                        pipeline.simulate(actions, backward_cost=2), _pipe_sends(plan, saved.parts))


def _in_flight(actions: list[pipeline.Action]) -> int:
    """The most chunk-micro-batches whose forward ran and whose backward did not yet, at once."""
    held = peak = 0
    for action in actions:
        held += 1 if action.kind == "F" else -1
        peak = max(peak, held)
    return peak


def _pipe_sends(plan: Plan, parts: list[PartActivations]) -> int:
    """Bytes pipeline rank 0 sends per micro-batch: each of its chunks' output carry to the next
    chunk, and the gradient of each of its chunks' input carry back to the previous one."""
    sent = 0
    for i in range(1, len(plan.parts)):
        before, after = plan.parts[i - 1].chunk, plan.parts[i].chunk
        if before != after:
            sent += parts[i].input_bytes * ((plan.parts[i - 1].stage == 0) + (plan.parts[i].stage == 0))
    return sent
