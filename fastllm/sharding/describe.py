"""``describe``: what each rank holds of every parameter, and its memory, under a layout.

Per parameter: global shape, the spec of the params the train state holds at the ZeRO stage, the
local shape and bytes per rank. Per rank totals: parameters (fp32 masters unless told otherwise),
gradients (fp32, in the stage's gradient layout) and optimizer state (``moments`` fp32 tensors per
parameter, Adam's two, in the optimizer layout). Shards are equal on every rank of a pipeline
stage; each stage holds only its own parts' parameters (describe the mesh seen from a rank of it). Works on :meth:`Mesh.abstract` meshes: plan a 70B layout on a laptop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fastllm import nn, tree
from fastllm.sharding.mesh import Mesh
from fastllm.sharding.rules import COMPUTE_RULES, Rules
from fastllm.sharding.spec import PartitionSpec, is_spec, local_shape

__all__ = ["describe", "Description", "Row"]


@dataclass(frozen=True)
class Row:
    path: str
    shape: tuple[int, ...]
    spec: PartitionSpec  # of the params held at this ZeRO stage
    local_shape: tuple[int, ...]
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int


@dataclass(frozen=True)
class Description:
    mesh_shape: dict[str, int]
    zero_stage: int
    rows: tuple[Row, ...]

    @property
    def totals(self) -> dict[str, int]:
        """Bytes per rank: ``params``, ``grads``, ``optimizer`` and their ``total``."""
        sums = {
            "params": sum(r.param_bytes for r in self.rows),
            "grads": sum(r.grad_bytes for r in self.rows),
            "optimizer": sum(r.optimizer_bytes for r in self.rows),
        }
        return {**sums, "total": sum(sums.values())}

    def __str__(self) -> str:
        mesh = " x ".join(f"{axis}={size}" for axis, size in self.mesh_shape.items())
        lines = [f"mesh {mesh}, ZeRO stage {self.zero_stage}; bytes per rank",
                 f"{'parameter':<34} {'global shape':<18} {'spec':<34} {'local shape':<18} {'bytes':>12}"]
        for r in self.rows:
            spec = ", ".join(str(entry) for entry in r.spec)
            lines.append(f"{r.path:<34} {str(r.shape):<18} {'(' + spec + ')':<34} "
                         f"{str(r.local_shape):<18} {r.param_bytes:>12,}")
        totals = self.totals
        lines.append("per rank: " + ", ".join(f"{name} {_mib(value)}" for name, value in totals.items()))
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def describe(
    model: Any,
    mesh: Mesh,
    *,
    rules: Rules = COMPUTE_RULES,
    zero_stage: int = 0,
    param_dtype: torch.dtype = torch.float32,
    moments: int = 2,
    virtual_stages: int = 1,
    split: tuple[int, ...] | None = None,
) -> Description:
    """Per-parameter shards and per-rank memory of a :class:`fastllm.nn.Model` (or its bare
    declarations); ``print`` it for a table."""
    from fastllm.sharding.partitioner import Partitioner

    plan = Partitioner(mesh, zero_stage=zero_stage, rules=rules, virtual_stages=virtual_stages, split=split).plan(model)
    flat = {name: tree.flatten(specs, is_leaf=is_spec) for name, specs in
            (("params", plan.params), ("grads", plan.grads), ("opt", plan.opt_state))}
    param_size = torch.empty((), dtype=param_dtype).element_size()
    rows = []
    for path, declared in tree.flatten(plan.declarations, is_leaf=nn.is_param).items():
        if not plan.holds(path, mesh.rank("pipe")):
            continue  # another pipeline stage's
        numel = {name: math.prod(local_shape(declared.shape, specs[path], mesh, name=path))
                 for name, specs in flat.items()}
        rows.append(Row(
            path, declared.shape, flat["params"][path],
            local_shape(declared.shape, flat["params"][path], mesh, name=path),
            numel["params"] * param_size, numel["grads"] * 4, numel["opt"] * 4 * moments,
        ))
    return Description(dict(mesh.shape), zero_stage, tuple(rows))
