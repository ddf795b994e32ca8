"""The partitioner: (mesh, rules, ZeRO stage) -> each rank's shards, their layouts and collectives.

Every parameter has two specs, resolved from its logical axes by two rules tables:

* **compute** (:data:`COMPUTE_RULES`): how a layer uses it (Megatron tensor parallelism);
* **storage** (:data:`STORAGE_RULES`): the compute spec plus a ``data`` split (ZeRO).

The partitioner requires the storage spec to refine the compute spec by a ``data`` split on at most
one dim, as the minor axis of that dim: a storage shard is then a block of the compute shard, and
moving between them is a slice (compute -> storage) or an all-gather over ``data`` (storage ->
compute, backward: reduce-scatter). The ZeRO stage (Rajbhandari et al. 2020) picks which trees
follow the storage spec:

=========  ==========  ==========  ================
stage      params      gradients   optimizer state
=========  ==========  ==========  ================
0          compute     compute     compute
1          compute     compute     storage
2          compute     storage     storage
3          storage     storage     storage
=========  ==========  ==========  ================

A rank initialises only its shards, each drawn exactly as :func:`fastllm.nn.init` draws the whole
tensor and then sliced, so the values are the slice of the unsharded init, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from fastllm import nn, random, tree
from fastllm.sharding import collectives as C
from fastllm.sharding.mesh import Mesh
from fastllm.sharding.overlap import GradientReduction
from fastllm.sharding.p2p import TRANSPORTS
from fastllm.sharding.prefetch import PrefetchGather
from fastllm.sharding.rules import COMPUTE_RULES, STORAGE_RULES, Rules, resolve
from fastllm.sharding.spec import PartitionSpec, is_spec, local_shape, shard
from fastllm.sharding.tensor_parallel import ParallelLayout

__all__ = ["Partitioner", "Plan", "param_declarations"]

ZERO_STAGES = (0, 1, 2, 3)


def param_declarations(declarations: Any) -> Any:
    """``declarations`` checked to be a tree of :class:`fastllm.nn.Param` (what a model's
    ``param_specs(config)`` returns). The caller passes them: sharding never imports models."""
    leaves = tree.leaves(declarations, is_leaf=nn.is_param)
    if not leaves or not all(nn.is_param(leaf) for leaf in leaves):
        got = type(declarations).__name__
        raise TypeError(f"the partitioner takes a tree of fastllm.nn.Param declarations (e.g. "
                        f"fastllm.models.param_specs(config)), got a {got}")
    return declarations


def _data_dim(compute: PartitionSpec, storage: PartitionSpec, path: str) -> int | None:
    """The dim that storage splits further over ``data`` (``None``: not split over data)."""
    found = None
    for dim, (c, s) in enumerate(zip(compute, storage)):
        c_axes, s_axes = PartitionSpec(c).axes(0), PartitionSpec(s).axes(0)
        if c_axes == s_axes:
            continue
        if s_axes == c_axes + ("data",) and found is None:
            found = dim
            continue
        raise ValueError(
            f"{path}: storage spec {storage!r} must be the compute spec {compute!r} plus 'data' as "
            "the minor axis of one dim (the partitioner moves between them by slicing/gathering)"
        )
    return found


@dataclass(frozen=True)
class Plan:
    """Specs of one model under a partitioner: trees shaped like the params (flat dicts inside)."""

    declarations: Any
    compute: Any  # tree of PartitionSpec
    storage: Any
    zero_stage: int

    @cached_property
    def flat_compute(self) -> dict[str, PartitionSpec]:
        return tree.flatten(self.compute, is_leaf=is_spec)

    @cached_property
    def flat_storage(self) -> dict[str, PartitionSpec]:
        return tree.flatten(self.storage, is_leaf=is_spec)

    @cached_property
    def data_dims(self) -> dict[str, int | None]:
        return {
            path: _data_dim(spec, self.flat_storage[path], path) for path, spec in self.flat_compute.items()
        }

    @property
    def params(self) -> Any:
        return self.storage if self.zero_stage >= 3 else self.compute

    @property
    def grads(self) -> Any:
        return self.storage if self.zero_stage >= 2 else self.compute

    @property
    def opt_state(self) -> Any:
        return self.storage if self.zero_stage >= 1 else self.compute


class Partitioner:
    """Turns a mesh, two rules tables and a ZeRO stage into shards, layouts and collectives.

    ``sequence_parallel`` keeps the residual stream split over ``seq`` between the tensor-parallel
    regions; ``reduce_dtype`` is the dtype gradients are summed in over ``data`` (float32, or
    bfloat16 to halve the traffic); ``bucket_bytes`` bounds one flattened gradient collective.
    ``overlap`` (default) reduces gradients during backward and prefetches ZeRO-3 gathers one block
    ahead (:mod:`fastllm.sharding.overlap`, :mod:`fastllm.sharding.prefetch`); ``overlap=False``
    runs every collective synchronously where it is needed (same results; for debugging).
    ``transport`` moves the overlapped ZeRO-3 gathers and reduce-scatters: ``"copy_engine"``
    through NVLink copy engines and symmetric memory (:mod:`fastllm.sharding.p2p`: no SMs taken
    from the GEMMs; CUDA, NCCL and one host), ``"nccl"`` as NCCL collectives, ``"auto"`` (default)
    the copy engines where they can run, else NCCL.
    """

    def __init__(
        self,
        mesh: Mesh,
        *,
        zero_stage: int = 0,
        compute_rules: Rules = COMPUTE_RULES,
        storage_rules: Rules = STORAGE_RULES,
        sequence_parallel: bool = False,
        reduce_dtype: torch.dtype = torch.float32,
        bucket_bytes: int = 64 << 20,
        overlap: bool = True,
        transport: str = "auto",
    ):
        if zero_stage not in ZERO_STAGES:
            raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage!r}")
        if mesh.size("pipe") > 1:
            raise NotImplementedError(
                f"pipeline parallelism (mesh pipe={mesh.size('pipe')}) is not supported yet; use pipe=1"
            )
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if reduce_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"reduce_dtype must be torch.float32 or torch.bfloat16, got {reduce_dtype}")
        self.mesh = mesh
        self.zero_stage = zero_stage
        self.compute_rules = compute_rules
        self.storage_rules = storage_rules
        self.sequence_parallel = bool(sequence_parallel) and mesh.size("tensor") > 1
        self.reduce_dtype = reduce_dtype
        self.bucket_bytes = int(bucket_bytes)
        self.overlap = bool(overlap)
        self.transport = transport

    def __repr__(self) -> str:
        sp = ", sequence_parallel" if self.sequence_parallel else ""
        sync = ", overlap=False" if not self.overlap else ""
        transport = f", transport={self.transport!r}" if self.transport != "auto" else ""
        return f"Partitioner({self.mesh!r}, zero_stage={self.zero_stage}{sp}{sync}{transport})"

    # --- specs ------------------------------------------------------------------------------
    def plan(self, declarations: Any) -> Plan:
        """Compute and storage specs of every parameter of a tree of :class:`fastllm.nn.Param`."""
        declarations = param_declarations(declarations)
        axes, shapes = nn.axes(declarations), nn.shapes(declarations)
        if self.mesh.size("tensor") > 1:
            _refuse_experts(axes)
        compute = resolve(axes, shapes, self.mesh, self.compute_rules)
        storage = resolve(axes, shapes, self.mesh, self.storage_rules)
        for path, spec in tree.flatten(compute, is_leaf=is_spec).items():
            if "data" in spec.used_axes:
                raise ValueError(f"{path}: the compute rules split it over 'data' ({spec!r}); "
                                 "parameters may only be split over 'data' in storage (ZeRO)")
        plan = Plan(declarations, compute, storage, self.zero_stage)
        plan.data_dims  # validates storage against compute now, with the path in the error
        return plan

    def param_specs(self, declarations: Any) -> Any:
        """Tree of :class:`PartitionSpec` of the params a train state holds at this ZeRO stage."""
        return self.plan(declarations).params

    def grad_specs(self, declarations: Any) -> Any:
        return self.plan(declarations).grads

    def opt_state_specs(self, declarations: Any) -> Any:
        """Specs of each params-shaped tree inside the optimizer state (scalars are replicated)."""
        return self.plan(declarations).opt_state

    # --- materialising ------------------------------------------------------------------------
    def init_params(
        self,
        declarations: Any,
        key: random.Key,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Any:
        """This rank's shards (in the params layout of the ZeRO stage): each parameter drawn from
        ``fold_in(key, path)`` as :func:`fastllm.nn.init` draws it, then sliced with its spec."""
        plan = self.plan(declarations)
        device = self.mesh.device if device is None else torch.device(device)
        flat_specs = tree.flatten(plan.params, is_leaf=is_spec)

        def make(path: str, declared: nn.Param) -> torch.Tensor:
            spec = flat_specs[path]
            if device.type == "meta":
                shape = local_shape(declared.shape, spec, self.mesh, name=path)
                return torch.empty(shape, dtype=dtype, device="meta")
            full = declared.initializer(random.fold_in(key, path), declared.shape)
            return shard(full, spec, self.mesh, name=path).to(device=device, dtype=dtype)

        return tree.map_with_path(make, plan.declarations, is_leaf=nn.is_param)

    def layout(self, declarations: Any) -> ParallelLayout:
        """The activation layout to pass to ``fastllm.models.loss(..., layout=)``."""
        plan = self.plan(declarations)
        gather = None
        if self.zero_stage >= 3 and self.overlap and self.mesh.size("data") > 1:
            gather = PrefetchGather(self.mesh, plan.data_dims, self.reduce_dtype, transport=self.transport)
        elif self.zero_stage >= 3:
            gather = _Gather(self.mesh, plan.data_dims)
        return ParallelLayout(self.mesh, sequence_parallel=self.sequence_parallel, gather=gather)

    def gradient_reduction(self, plan: Plan, masters: Any, layout: ParallelLayout) -> GradientReduction:
        """One step's gradient reduction overlapped with backward (``overlap=True``): ``masters``
        is the tree of leaves the step differentiates, ``layout`` the one its model runs under."""
        gather = layout.gather if isinstance(layout.gather, PrefetchGather) else None
        return GradientReduction(
            masters, zero_stage=self.zero_stage, data_dims=plan.data_dims, compute_specs=plan.flat_compute,
            mesh=self.mesh, sequence_parallel=self.sequence_parallel, dtype=self.reduce_dtype,
            limit_bytes=self.bucket_bytes, gather=gather,
        )

    def describe(self, declarations: Any, **kwargs):
        from fastllm.sharding.describe import describe

        return describe(
            declarations, self.mesh, compute_rules=self.compute_rules,
            storage_rules=self.storage_rules, zero_stage=self.zero_stage, **kwargs,
        )


class _Gather:
    """ZeRO-3: the storage shards of one part of the model -> its compute shards (all-gather over
    ``data``; backward: reduce-scatter of the gradients)."""

    def __init__(self, mesh: Mesh, data_dims: dict[str, int | None]):
        self.mesh, self.data_dims = mesh, data_dims

    def __call__(self, path: str, part: Any) -> Any:
        def gather(sub: str, x: torch.Tensor) -> torch.Tensor:
            dim = self.data_dims[f"{path}.{sub}"]
            return x if dim is None else C.all_gather(x, dim, "data", self.mesh)

        return tree.map_with_path(gather, part)


def _refuse_experts(axes: Any) -> None:
    for path, names in tree.leaves_with_path(axes, is_leaf=tree.is_axes):
        if "experts" in names:
            raise NotImplementedError(
                f"{path}: mixture-of-experts layers under tensor parallelism (expert parallel) are "
                "not supported yet; use mesh tensor=1 for MoE models"
            )
