"""The partitioner: (mesh, rules, ZeRO stage) -> each rank's shards, the activation layout, the
gathers and gradient reductions of a train step, for any model (an :class:`fastllm.nn.Model`).

One rules table lays out parameters and activations alike. Every parameter has two specs:

* **compute**: the rules on its logical dims: how operations use it (the table's ``heads``,
  ``mlp`` and ``vocab`` on ``tensor`` are Megatron's tensor parallelism);
* **storage**: the compute spec plus a ``data`` split on the first dim of its compute shard that
  ``data`` divides (ZeRO): a storage block is whole rows of the compute shard, and moving between
  them is a slice (compute -> storage) or an all-gather over ``data`` (backward: reduce-scatter).

The ZeRO stage (Rajbhandari et al. 2020) picks which trees follow the storage spec:

=========  ==========  ==========  ================
stage      params      gradients   optimizer state
=========  ==========  ==========  ================
0          compute     compute     compute
1          compute     compute     storage
2          compute     storage     storage
3          storage     storage     storage
=========  ==========  ==========  ================

Each parameter's gradient is a partial sum over the mesh axes that split the operations using it
and not the parameter (:meth:`MeshLayout.param_reduce_axes`): ``data`` (but for experts the rules
spread over ``data``: each sees all its tokens), ``tensor`` too for parameters replicated over it
when the token stream's ``seq`` is split. The model's parts order the ZeRO-3 gathers and the
gradient buckets; the repeated parts (along ``layers``) are what the ``layers`` rule deals to
pipeline stages.

A rank initialises only its shards, each drawn exactly as :func:`fastllm.nn.init` draws the whole
tensor and then sliced, so the values are the slice of the unsharded init, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Optional

import torch

from fastllm import nn, random, tree
from fastllm.sharding.layout import MeshLayout
from fastllm.sharding.mesh import Mesh
from fastllm.sharding.overlap import GradientReduction
from fastllm.sharding.p2p import TRANSPORTS
from fastllm.sharding.pipeline import chunk_of_parts
from fastllm.sharding.rules import COMPUTE_RULES, Rules, resolve
from fastllm.sharding.spec import PartitionSpec, is_spec, local_shape, shard
from fastllm.sharding.zero3 import PartGather

__all__ = ["Partitioner", "Plan", "PartPlan", "as_model", "ZERO_STAGES"]

ZERO_STAGES = (0, 1, 2, 3)


def as_model(model_or_declarations: Any) -> nn.Model:
    """``model_or_declarations`` as an :class:`fastllm.nn.Model`: a model, or a bare tree of
    :class:`fastllm.nn.Param` (one part: enough to plan shards and memory, not to run)."""
    if isinstance(model_or_declarations, nn.Model):
        return model_or_declarations
    leaves = tree.leaves(model_or_declarations, is_leaf=nn.is_param)
    if not leaves or not all(nn.is_param(leaf) for leaf in leaves) or not isinstance(model_or_declarations, dict):
        got = type(model_or_declarations).__name__
        raise TypeError(f"the partitioner takes a fastllm.nn.Model (e.g. fastllm.models.model(config)) or a dict "
                        f"of fastllm.nn.Param declarations, got a {got}")
    return nn.Model(model_or_declarations, (nn.Part("model", [(key,) for key in model_or_declarations], _unrunnable),))


def _unrunnable(*_):
    raise TypeError("a model planned from bare declarations has no parts to run; pass a fastllm.nn.Model")


def _data_dim(compute: PartitionSpec, storage: PartitionSpec, path: str) -> Optional[int]:
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
class PartPlan:
    """One part of the model under the plan: the leaves it uses, its index along ``layers`` (if a
    repeated unit), its pipeline chunk and the pipeline rank that runs it (``chunk mod pipe``)."""

    name: str
    leaves: tuple[str, ...]
    layer: Optional[int]
    chunk: int = 0
    stage: int = 0


@dataclass(frozen=True)
class Plan:
    """Specs of one model under a partitioner: trees shaped like the params, plus per-leaf facts."""

    model: nn.Model
    compute: Any  # tree of PartitionSpec
    storage: Any
    zero_stage: int
    reduce_axes: dict[str, frozenset]  # dotted path -> mesh axes its gradient is summed over
    parts: tuple[PartPlan, ...]

    @property
    def declarations(self) -> Any:
        return self.model.declarations

    @cached_property
    def flat_compute(self) -> dict[str, PartitionSpec]:
        return tree.flatten(self.compute, is_leaf=is_spec)

    @cached_property
    def flat_storage(self) -> dict[str, PartitionSpec]:
        return tree.flatten(self.storage, is_leaf=is_spec)

    @cached_property
    def data_dims(self) -> dict[str, Optional[int]]:
        return {path: _data_dim(spec, self.flat_storage[path], path) for path, spec in self.flat_compute.items()}

    @cached_property
    def first_use(self) -> dict[str, int]:
        """Each leaf's first part (the gradient buckets go in reverse of this)."""
        first: dict[str, int] = {}
        for index, part in enumerate(self.parts):
            for path in part.leaves:
                first.setdefault(path, index)
        return first

    @cached_property
    def chunks(self) -> int:
        return max(part.chunk for part in self.parts) + 1

    @cached_property
    def stages_of(self) -> dict[str, tuple[int, ...]]:
        """The pipeline ranks that hold each leaf (those running a part that uses it): one, or the
        first and the last for a table the embedding and the head share."""
        stages: dict[str, set[int]] = {}
        for part in self.parts:
            for path in part.leaves:
                stages.setdefault(path, set()).add(part.stage)
        return {path: tuple(sorted(s)) for path, s in stages.items()}

    def holds(self, path: str, pipe_rank: int) -> bool:
        return pipe_rank in self.stages_of[path]

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
    """Turns a mesh, a rules table and a ZeRO stage into shards, an activation layout and the
    collectives of a train step.

    ``rules``: the one table for parameters and activations (default :data:`COMPUTE_RULES`; put
    ``("seq", "tensor")`` in place of ``("seq", None)`` for sequence parallelism);
    ``reduce_dtype``: the dtype gradients are summed in over ``data`` (float32, or bfloat16 to halve
    the traffic); ``bucket_bytes`` bounds one flattened gradient collective. ``overlap`` (default)
    reduces gradients during backward and prefetches ZeRO-3 gathers one part ahead;
    ``overlap=False`` runs every collective where it is needed (same results; for debugging).
    ``transport`` moves the ZeRO-3 gathers and reduce-scatters: ``"copy_engine"`` through NVLink
    copy engines (:mod:`fastllm.sharding.p2p`; CUDA, NCCL, one host), ``"nccl"``, or ``"auto"``.
    """

    def __init__(
        self,
        mesh: Mesh,
        *,
        rules: Rules = COMPUTE_RULES,
        zero_stage: int = 0,
        reduce_dtype: torch.dtype = torch.float32,
        bucket_bytes: int = 64 << 20,
        overlap: bool = True,
        transport: str = "auto",
        virtual_stages: int = 1,
        split: Optional[tuple[int, ...]] = None,
    ):
        if zero_stage not in ZERO_STAGES:
            raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if reduce_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"reduce_dtype must be torch.float32 or torch.bfloat16, got {reduce_dtype}")
        if not isinstance(rules, Rules):
            raise TypeError(f"rules must be a fastllm.sharding.Rules, got {type(rules).__name__}")
        if rules.fallback is not None:
            raise ValueError("the rules table of a partitioner has no fallback: ZeRO adds 'data' in storage itself")
        self.mesh = mesh
        self.rules = rules
        self.storage_rules = Rules(rules.table, fallback="data")
        self.zero_stage = zero_stage
        self.reduce_dtype = reduce_dtype
        self.bucket_bytes = int(bucket_bytes)
        self.overlap = bool(overlap)
        self.transport = transport
        if virtual_stages < 1:
            raise ValueError(f"virtual_stages must be >= 1, got {virtual_stages}")
        self.virtual_stages, self.split = int(virtual_stages), None if split is None else tuple(split)
        self._layout = MeshLayout(mesh, rules)

    def __repr__(self) -> str:
        sync = ", overlap=False" if not self.overlap else ""
        transport = f", transport={self.transport!r}" if self.transport != "auto" else ""
        return f"Partitioner({self.mesh!r}, zero_stage={self.zero_stage}{sync}{transport})"

    # --- the plan ------------------------------------------------------------------------------
    def plan(self, model: Any) -> Plan:
        """Compute and storage specs, gradient sums and parts of a model (or bare declarations)."""
        model = as_model(model)
        declarations = model.declarations
        axes, shapes = nn.axes(declarations), nn.shapes(declarations)
        self._check_rule_names(axes, model.layer_dim)
        compute = resolve(axes, shapes, self.mesh, self.rules)
        storage = resolve(axes, shapes, self.mesh, self.storage_rules)
        flat_axes = tree.flatten(axes, is_leaf=tree.is_axes)
        for path, names in flat_axes.items():  # split over 'data' in compute only where the tokens are not
            self._layout.check_param(names, path)
        reduce_axes = {path: self._layout.param_reduce_axes(names) for path, names in flat_axes.items()}
        chunks = self._chunks(model)
        pipe = self.mesh.size("pipe")
        parts = tuple(PartPlan(part.name, tuple(model.leaves_of(part)), part.layer, chunk, chunk % pipe)
                      for part, chunk in zip(model.parts, chunks))
        plan = Plan(model, compute, storage, self.zero_stage, reduce_axes, parts)
        plan.data_dims  # validates storage against compute now, with the path in the error
        return plan

    def _check_rule_names(self, axes: Any, layer_dim: str) -> None:
        """A rule must name a dim the library's operations or the model's parameters use."""
        known = COMPUTE_RULES.names | {name for names in tree.leaves(axes, is_leaf=tree.is_axes) for name in names}
        unknown = sorted(self.rules.names - known - {layer_dim})
        if unknown:
            raise ValueError(f"rules name dims that nothing has: {unknown} (the model's parameter dims: "
                             f"{sorted(known - COMPUTE_RULES.names) or 'only standard ones'}; standard dims: "
                             f"{sorted(COMPUTE_RULES.names)})")

    def _chunks(self, model: nn.Model) -> list[int]:
        """The pipeline chunk of each part: the ``layers`` rule's axes (``pipe``) times the virtual
        stages cut the repeated parts into contiguous chunks (:mod:`fastllm.sharding.pipeline`)."""
        axes = self._layout.dims_of([(model.layer_dim,)])[model.layer_dim]
        ranks = self.mesh.size(axes)
        if axes and axes != ("pipe",):
            raise ValueError(f"the model's {model.layer_dim!r} dim maps to {axes}: only 'pipe' can hold stages")
        if ranks == 1:
            return [0] * len(model.parts)
        declared = tree.flatten(model.declarations, is_leaf=nn.is_param)
        sizes = [sum(declared[path].numel for path in model.leaves_of(part)) for part in model.parts]
        return chunk_of_parts([part.layer for part in model.parts], sizes, ranks * self.virtual_stages, self.split)

    def param_specs(self, model: Any) -> Any:
        """Tree of :class:`PartitionSpec` of the params a train state holds at this ZeRO stage."""
        return self.plan(model).params

    def grad_specs(self, model: Any) -> Any:
        return self.plan(model).grads

    def opt_state_specs(self, model: Any) -> Any:
        """Specs of each params-shaped tree inside the optimizer state (scalars are replicated)."""
        return self.plan(model).opt_state

    # --- materialising ------------------------------------------------------------------------
    def init_params(
        self,
        model: Any,
        key: random.Key,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Any:
        """This rank's shards (in the params layout of the ZeRO stage): each parameter drawn from
        ``fold_in(key, path)`` as :func:`fastllm.nn.init` draws it, then sliced with its spec.
        Parameters of other pipeline stages are ``None`` (the tree keeps its structure)."""
        plan = self.plan(model)
        device = self.mesh.device if device is None else torch.device(device)
        flat_specs = tree.flatten(plan.params, is_leaf=is_spec)

        pipe_rank = self.mesh.rank("pipe")

        def make(path: str, declared: nn.Param) -> Optional[torch.Tensor]:
            if not plan.holds(path, pipe_rank):
                return None  # another pipeline stage's parameter
            spec = flat_specs[path]
            if device.type == "meta":
                shape = local_shape(declared.shape, spec, self.mesh, name=path)
                return torch.empty(shape, dtype=dtype, device="meta")
            full = declared.initializer(random.fold_in(key, path), declared.shape)
            return shard(full, spec, self.mesh, name=path).to(device=device, dtype=dtype)

        return tree.map_with_path(make, plan.declarations, is_leaf=nn.is_param)

    # --- what a step runs ----------------------------------------------------------------------
    def layout(self, *, trace: Optional[list] = None) -> Optional[MeshLayout]:
        """The activation layout to run models under; ``None`` on one rank (every operation is local).
        With ``data`` alone most operations need no move, but a statistic over the global batch (a
        mixture of experts' router load) or experts spread over ``data`` do."""
        if trace is None:
            return None if not self._layout.active else self._layout
        return MeshLayout(self.mesh, self.rules, trace=trace)

    def gather(self, plan: Plan) -> Optional[PartGather]:
        """The ZeRO-3 gathers of a plan's parts (``None`` below stage 3 or with one data rank)."""
        if self.zero_stage < 3 or self.mesh.size("data") == 1:
            return None
        parts = [(list(part.leaves), part.layer is not None) for part in plan.parts]
        # a pipeline interleaves the micro-batches' parts: each part is gathered when it runs
        prefetch = self.overlap and self.mesh.size("pipe") == 1
        return PartGather(self.mesh, parts, plan.data_dims, self.reduce_dtype, transport=self.transport,
                          prefetch=prefetch)

    def gradient_reduction(self, plan: Plan, masters: dict[str, torch.Tensor],
                           gather: Optional[PartGather]) -> GradientReduction:
        """One step's gradient reduction: ``masters`` is the flat ``{path: leaf}`` the step
        differentiates, ``gather`` the step's ZeRO-3 gathers (if any). Under a pipeline the
        micro-batches' backwards interleave, so everything is reduced after the schedule."""
        return GradientReduction(
            masters, zero_stage=self.zero_stage, data_dims=plan.data_dims, reduce_axes=plan.reduce_axes,
            use_order=plan.first_use, mesh=self.mesh, dtype=self.reduce_dtype, limit_bytes=self.bucket_bytes,
            gather=gather, overlap=self.overlap and self.mesh.size("pipe") == 1,
        )

    def describe(self, model: Any, **kwargs):
        from fastllm.sharding.describe import describe

        return describe(model, self.mesh, rules=self.rules, zero_stage=self.zero_stage,
                        virtual_stages=self.virtual_stages, split=self.split, **kwargs)
