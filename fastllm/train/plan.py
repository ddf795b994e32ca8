"""Plan a config's layout without processes or memory: the partition plan of its model on an
abstract mesh of the config's size, and a dry run of one micro-batch on ``meta`` tensors that
records every collective the layout's operations would run (forward and backward).

    report = plan_layout(config)          # raises, naming the problem, for a layout that cannot run
    print(report)                          # per-rank memory and the collectives of one micro-batch

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

__all__ = ["LayoutReport", "plan_layout"]


@dataclass(frozen=True)
class LayoutReport:
    """What one rank of a config's layout holds and moves."""

    mesh: Mesh
    plan: Plan
    description: Description  # per-rank bytes of params, gradients and optimizer state
    micro_batch_size: int
    grad_accum: int
    collectives: tuple[Collective, ...]  # of the operations in one micro-batch, forward and backward
    timeline: Optional[pipeline.Timeline] = None  # the pipeline schedule of one step, when pipe > 1

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


def plan_layout(config: Config, model: Optional[nn.Model] = None) -> LayoutReport:
    """The layout of ``config`` (and ``model``, default the config's built-in model) on an abstract
    mesh of ``config.mesh``'s size, seen from rank 0 (every rank holds as much)."""
    m = config.mesh
    mesh = Mesh.abstract(data=m.data, tensor=m.tensor, pipe=m.pipe)
    model = default_model(config) if model is None else model
    partitioner = partitioner_from_config(config, mesh)
    plan = partitioner.plan(model)
    micro, accum = config.train.micro_batch(m.data), config.train.grad_accum(m.data)
    trace: list[Collective] = []
    tokens = torch.zeros((micro, config.data.seq_len), dtype=torch.long, device="meta")
    batch = {"tokens": tokens, "targets": tokens, "segment_ids": tokens}
    with torch.no_grad():
        params = _meta_params(plan, mesh, COMPUTE_DTYPES[config.train.precision])
        nn.run(model, params, batch, layout=MeshLayout(mesh, partitioner.rules, trace=trace))
    timeline = None
    if m.pipe > 1:
        timeline = pipeline.simulate(pipeline.schedule(config.pipe.schedule, m.pipe, accum, config.pipe.virtual_stages),
                                     backward_cost=2)
    return LayoutReport(mesh, plan, partitioner.describe(model), micro, accum, tuple(trace), timeline)
