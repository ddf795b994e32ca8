"""Per-rank memory and communication of a layout, and the layouts of N GPUs that fit, ranked.

Built on :func:`fastllm.train.plan.plan_layout` (no processes, no GPU): parameters, gradients and
optimizer state come from the partition plan (:mod:`fastllm.sharding.describe`), activations from
the meta dry run's saved tensors, and communication from its recorded collectives plus the data
axis' gradient reduction and ZeRO gathers, which run outside the model's operations:

- gradients over ``data``: an all-reduce (ZeRO 0; a ring moves ``2 (n-1)/n`` of the bytes per
  rank) or a reduce-scatter (ZeRO 1-3, ``(n-1)/n``) once per step;
- parameters over ``data``: an all-gather of the updated shards once per step (ZeRO 1-2), or of
  each part before its forward and again before its backward in every micro-batch (ZeRO 3).

Temporary buffers are what a step needs beyond the saved activations at its peak: the backward's
working buffers (:meth:`fastllm.train.plan.Activations.peak_bytes`), the compute-dtype copy of
the parameters under bf16/fp16, under accumulation (``grad_accum > 1``) one fresh fp32 gradient
as large as the largest parameter (autograd adds each leaf's fresh gradient into the accumulated
one as soon as it is computed, so no more than one is alive at a time), and under ZeRO 3 the
gathered parameters of the two largest parts (one in use, one prefetched).
Gradients are counted in fp32 everywhere: where the step keeps a bf16 compute copy (one device,
one micro-batch, :mod:`fastllm.train.compute_copy`) they are bf16, and the plan is an upper bound
(5% over on CPU where the weights dominate, 1% where activations do).
tests/train/test_memory_plan.py checks the total against the peak of the CPU allocations of real
steps (torch's memory profiler).

The ranking of layouts is by an estimated step time: model FLOPs at ``ASSUMED_MFU`` of the peak
(``x 4/3`` with recomputation) plus communication at ``ASSUMED_BUS_BYTES_PER_S``. Both constants
are rough; the order, not the seconds, is what the table is for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from fastllm import nn, tree
from fastllm.config import apply_overrides
from fastllm.train.config import Config
from fastllm.train.metrics import PEAK_FLOPS
from fastllm.train.plan import LayoutReport, plan_layout
from fastllm.train.step import COMPUTE_DTYPES

__all__ = ["MemoryPlan", "LayoutChoice", "Ranking", "plan_memory", "search_layouts", "ASSUMED_MFU",
           "ASSUMED_BUS_BYTES_PER_S", "HEADROOM"]

ASSUMED_MFU = 0.4  # of PEAK_FLOPS, for ranking layouts only
ASSUMED_BUS_BYTES_PER_S = 200e9  # per GPU within one NVLink host, for ranking layouts only
HEADROOM = 0.9  # of a GPU's memory a layout may plan to use (the rest: CUDA context, fragmentation)


def _gib(n: int | float) -> str:
    """Bytes in the largest binary unit that keeps a digit before the point."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank and communication per step of one config's layout."""

    config: Config
    report: LayoutReport
    temporaries: int  # beyond saved activations: see the module docstring
    communication: dict[str, int]  # bytes each rank sends per optimizer step, by what moves them

    @property
    def remat(self) -> bool:
        return self.config.train.remat == "block"

    def activations(self, remat: Optional[bool] = None) -> int:
        return self.report.activations.bytes(self.remat if remat is None else remat)

    def rows(self) -> dict[str, int]:
        totals = self.report.description.totals
        return {"params": totals["params"], "grads": totals["grads"], "optimizer": totals["optimizer"],
                "activations": self.activations(), "temporaries": self.temporaries}

    @property
    def total(self) -> int:
        return sum(self.rows().values())

    @property
    def step_bytes(self) -> int:
        return sum(self.communication.values())

    def as_dict(self) -> dict[str, Any]:
        return {"mesh": dict(self.report.mesh.shape), "zero_stage": self.config.zero.stage, "remat": self.remat,
                "bytes_per_rank": {**self.rows(), "activations_without_remat": self.activations(False),
                                   "activations_with_remat": self.activations(True), "total": self.total},
                "communication_bytes_per_step": self.communication}

    def __str__(self) -> str:
        m, t = self.report.mesh, self.config.train
        lines = [f"layout data={m.size('data')} x tensor={m.size('tensor')} x pipe={m.size('pipe')}, ZeRO stage "
                 f"{self.config.zero.stage}, {t.precision}, remat={t.remat}; micro-batch {self.report.micro_batch_size}"
                 f" x {self.report.grad_accum} of {self.config.data.seq_len} tokens per rank and step",
                 "memory per rank:"]
        for name, value in self.rows().items():
            lines.append(f"  {name:<12} {_gib(value):>14}")
        lines.append(f"  {'total':<12} {_gib(self.total):>14}")
        lines.append(f"  (activations {_gib(self.activations(False))} without recomputation, "
                     f"{_gib(self.activations(True))} with train.remat=block)")
        lines.append("communication per rank and step:")
        for name, value in self.communication.items():
            lines.append(f"  {name:<34} {_gib(value):>14}")
        if not self.communication:
            lines.append("  nothing: one rank, or every operation local")
        return "\n".join(lines)


def _whole_numels(config: Config, report: LayoutReport) -> dict[str, int]:
    """Elements of each parameter on this rank's tensor shard, whole over ``data`` (gathered)."""
    n = report.mesh.size("data") if config.zero.stage == 3 else 1  # below stage 3 params are whole over data
    return {row.path: math.prod(row.local_shape) * (n if report.plan.data_dims.get(row.path) is not None else 1)
            for row in report.description.rows}


def _part_bytes(config: Config, report: LayoutReport, dtype_size: int) -> list[int]:
    """Gathered compute bytes of each part's parameters."""
    numels = _whole_numels(config, report)
    return [sum(numels[leaf] for leaf in part.leaves) * dtype_size for part in report.plan.parts if part.stage == 0]


def _temporaries(config: Config, report: LayoutReport) -> int:
    dtype_size = COMPUTE_DTYPES[config.train.precision].itemsize
    remat = config.train.remat == "block"
    temp = report.activations.peak_bytes(remat) - report.activations.bytes(remat)
    params = report.description.totals["params"]
    if config.train.precision != "fp32":
        temp += params // 4 * dtype_size  # fp32 masters cast to the compute dtype
    if report.grad_accum > 1:  # one leaf's fresh gradient at a time, added in place (module docstring)
        temp += max(_whole_numels(config, report).values()) * 4
    if config.zero.stage == 3 and report.mesh.size("data") > 1:
        temp += sum(sorted(_part_bytes(config, report, dtype_size))[-2:])
    return temp


def _communication(config: Config, report: LayoutReport) -> dict[str, int]:
    out: dict[str, int] = {}
    for (kind, axis), nbytes in sorted(report.traffic().items()):
        out[f"{kind} over {axis} (activations)"] = nbytes * report.grad_accum
    if report.pipe_sends:
        out["send/recv over pipe (activations)"] = report.pipe_sends * report.grad_accum
    n = report.mesh.size("data")
    if n == 1:
        return out
    share = (n - 1) / n
    numel = sum(_whole_numels(config, report).values())
    grads, compute = numel * 4, numel * COMPUTE_DTYPES[config.train.precision].itemsize  # fp32 reduction
    stage = config.zero.stage
    if stage == 0:
        out["all_reduce over data (gradients)"] = int(2 * share * grads)
    else:
        out["reduce_scatter over data (gradients)"] = int(share * grads)
    if stage in (1, 2):
        out["all_gather over data (parameters)"] = int(share * compute)
    if stage == 3:
        out["all_gather over data (parameters)"] = int(2 * share * compute * report.grad_accum)
    return out


def plan_memory(config: Config, model: Optional[nn.Model] = None, *, target: str = "cuda") -> MemoryPlan:
    """Memory per rank and communication per step of ``config``'s layout (see the module
    docstring); ``target``: plan for a GPU's kernels (``"cuda"``) or a CPU's (``"cpu"``)."""
    report = plan_layout(config, model, target=target)
    return MemoryPlan(config, report, _temporaries(config, report), _communication(config, report))


# --- searching layouts ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LayoutChoice:
    plan: MemoryPlan
    step_s: float  # estimated, for ranking only

    @property
    def overrides(self) -> str:
        c = self.plan.config
        return (f"mesh.data={c.mesh.data} mesh.tensor={c.mesh.tensor} mesh.pipe={c.mesh.pipe} zero.stage={c.zero.stage} "
                f"train.remat={c.train.remat} train.micro_batch_size={c.train.micro_batch(c.mesh.data)}")


@dataclass(frozen=True)
class Ranking:
    gpus: int
    gpu_bytes: int
    fits: tuple[LayoutChoice, ...]  # fastest first
    too_big: tuple[LayoutChoice, ...]  # smallest first
    refused: tuple[str, ...]  # layouts the partitioner or the batch cannot take, with the reason

    def table(self, top: int = 8) -> str:
        lines = [f"layouts of {self.gpus} GPUs with {_gib(self.gpu_bytes)} each ({int(HEADROOM * 100)}% planned), "
                 f"fastest first (estimated: {int(ASSUMED_MFU * 100)}% MFU, {ASSUMED_BUS_BYTES_PER_S / 1e9:.0f} GB/s):",
                 f"  {'memory/rank':>14} {'comm/step':>12} {'step (est.)':>12}  overrides"]
        for choice in self.fits[:top]:
            lines.append(f"  {_gib(choice.plan.total):>14} {_gib(choice.plan.step_bytes):>12} {choice.step_s:>11.2f}s  "
                         f"{choice.overrides}")
        if not self.fits:
            lines.append("  none fits; the smallest:")
            for choice in self.too_big[:3]:
                lines.append(f"  {_gib(choice.plan.total):>14} {_gib(choice.plan.step_bytes):>12} {'-':>12}  "
                             f"{choice.overrides}")
        return "\n".join(lines)


def _step_seconds(plan: MemoryPlan, model: nn.Model) -> float:
    c = plan.config
    tokens = c.train.batch_size * c.data.seq_len / c.mesh.size  # per GPU: the model's FLOPs split evenly
    flops = model.flops_per_token(c.data.seq_len) if model.flops_per_token else 6 * _param_count(model)
    compute = tokens * flops / (ASSUMED_MFU * PEAK_FLOPS) * (4 / 3 if plan.remat else 1.0)
    if plan.report.timeline is not None:  # the pipeline's idle share stretches the step
        compute /= 1.0 - plan.report.timeline.bubble
    return compute + plan.step_bytes / ASSUMED_BUS_BYTES_PER_S


def _param_count(model: nn.Model) -> int:
    return sum(math.prod(p.shape) for p in tree.leaves(model.declarations, is_leaf=nn.is_param))


def candidate_overrides(config: Config, gpus: int) -> list[list[str]]:
    """Every data x tensor x pipe split of ``gpus`` (tensor and pipe up to 8) with each ZeRO stage,
    with and without recomputation."""
    out, t = [], config.train
    splits = [(tensor, pipe) for tensor in (1, 2, 4, 8) for pipe in (1, 2, 4, 8) if gpus % (tensor * pipe) == 0]
    for tensor, pipe in splits:
        data = gpus // (tensor * pipe)
        micro = t.micro_batch_size  # the recipe's, unless the batch cannot take it on this many data ranks
        if micro is None or t.batch_size % (micro * data):
            micro = t.batch_size // data if t.batch_size % data == 0 else None
        if micro is None:
            continue
        for stage in (0, 1, 2, 3):
            for remat in ("none", "block"):
                out.append([f"mesh.data={data}", f"mesh.tensor={tensor}", f"mesh.pipe={pipe}", f"zero.stage={stage}",
                            f"train.remat={remat}", f"train.micro_batch_size={micro}"])
    return out


def search_layouts(config: Config, model: Optional[nn.Model], *, gpus: int, gpu_bytes: int) -> Ranking:
    """Plan every candidate layout of ``gpus`` GPUs; those within ``HEADROOM`` of ``gpu_bytes`` fit."""
    from fastllm.train.trainer import default_model

    model = default_model(config) if model is None else model
    fits, too_big, refused = [], [], []
    for overrides in candidate_overrides(config, gpus):
        try:
            candidate = apply_overrides(config, overrides)
            plan = plan_memory(candidate, model)
        except (ValueError, TypeError) as error:  # a split the model's dims or the batch cannot take
            refused.append(f"{' '.join(overrides)}: {error}")
            continue
        choice = LayoutChoice(plan, _step_seconds(plan, model))
        (fits if plan.total <= HEADROOM * gpu_bytes else too_big).append(choice)
    fits.sort(key=lambda c: (c.step_s, c.plan.total))
    too_big.sort(key=lambda c: c.plan.total)
    return Ranking(gpus, gpu_bytes, tuple(fits), tuple(too_big), tuple(refused))
