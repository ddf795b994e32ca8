"""Rules: an ordered table from logical dim names to mesh axes, and its resolution into specs.

A table is ``((logical_name, mesh_axis | (axis, ...) | None), ...)``. Resolving one tensor's
logical axes (flax's ``logical_axis_rules`` semantics) visits the rules *in table order*; a rule
``(name, axes)`` applies to the still-undecided dims called ``name``:

* ``axes`` is ``None``: the dim is decided, replicated;
* every axis of ``axes`` is still free on this tensor: the dim is decided, split over ``axes``
  (the first such dim takes them; a mesh axis is used at most once per tensor);
* otherwise the rule is skipped and a later rule for ``name`` may apply.

Dims left undecided are replicated. So for every dim the first rule for its name whose mesh axes
are free wins, and when two dims of one tensor compete for an axis the earlier *rule* wins (table
order is the priority, not dim order). A name no rule mentions is an error: a typo must not
silently replicate a weight. A split that does not divide the dim is an error naming the path.

Two tables: :data:`COMPUTE_RULES`, how parameters are laid out when a layer computes with them
(Megatron tensor parallelism), and :data:`STORAGE_RULES`, how they are kept between steps (ZeRO-3:
additionally split over ``data``). ``Rules.fallback`` names an axis to add, after the table, to
every tensor that does not use it yet: on the first dim whose shard it divides (none: replicated),
so every parameter gets a ``data`` shard when its shape allows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastllm import tree
from fastllm.sharding.mesh import AXES, Mesh
from fastllm.sharding.spec import PartitionSpec, _as_axes, local_shape

__all__ = ["Rule", "Rules", "COMPUTE_RULES", "STORAGE_RULES", "resolve", "spec_for", "assign"]

Rule = tuple[str, str | tuple[str, ...] | None]


@dataclass(frozen=True)
class Rules:
    """An ordered rules table, plus an optional fallback mesh axis (see the module docstring)."""

    table: tuple[Rule, ...]
    fallback: str | None = None

    def __post_init__(self):
        table = tuple(tuple(rule) for rule in self.table)
        for index, rule in enumerate(table):
            if len(rule) != 2 or not isinstance(rule[0], str):
                raise ValueError(f"rule {index} must be (logical_name, mesh_axes), got {rule!r}")
            axes = _as_axes(rule[1]) if rule[1] is None or isinstance(rule[1], (str, tuple)) else None
            if axes is None or any(axis not in AXES for axis in axes) or len(set(axes)) != len(axes):
                raise ValueError(
                    f"rule {index} {rule!r}: the target must be None, a mesh axis or a tuple of "
                    f"distinct mesh axes among {AXES}"
                )
        if self.fallback is not None and self.fallback not in AXES:
            raise ValueError(f"Rules.fallback must be a mesh axis among {AXES}, got {self.fallback!r}")
        object.__setattr__(self, "table", table)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.table)

    def __add__(self, other: "Rules") -> "Rules":
        """``a + b``: ``a``'s rules first (they take priority), ``b``'s fallback unless ``b`` has none."""
        return Rules(self.table + other.table, other.fallback or self.fallback)

    def replace(self, name: str, target: str | tuple[str, ...] | None) -> "Rules":
        """The table with the first rule for ``name`` (and only it) now pointing at ``target``, in the
        same place (same priority); appended when there is none."""
        table = list(self.table)
        for index, (rule_name, _) in enumerate(table):
            if rule_name == name:
                table[index] = (name, target)
                return Rules(tuple(table), self.fallback)
        return Rules((*table, (name, target)), self.fallback)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], fallback: str | None = None) -> "Rules":
        """A table from an ordered ``{logical name: mesh axis | [axes] | None}`` (a config's form)."""
        def target(value):
            return tuple(value) if isinstance(value, (list, tuple)) else value

        return cls(tuple((name, target(value)) for name, value in mapping.items()), fallback)

    def as_mapping(self) -> dict[str, Any]:
        """``{name: target}`` of the first rule of each name (the form configs hold)."""
        mapping: dict[str, Any] = {}
        for name, target in self.table:
            mapping.setdefault(name, list(target) if isinstance(target, tuple) else target)
        return mapping


# One table for parameters and activations (so an op's operands always agree): split heads, MLP
# hidden units and the vocabulary over ``tensor`` (Megatron's tensor parallelism falls out of it),
# activations' batch over ``data``, the model's layers over ``pipe``. ``seq`` is the residual
# stream's sequence dim: ``("seq", "tensor")`` in its place is sequence parallelism (heads, mlp and
# vocab take ``tensor`` first wherever they meet ``seq``, so the attention and MLP cores keep the
# whole sequence). ``experts`` comes first: ``("experts", "data")`` in its place is expert
# parallelism (where routed tokens meet their experts, the experts take ``data`` and the tokens
# come whole; ``("experts", "tensor")`` spreads them over ``tensor``). ``router`` is the router's
# output, a score per expert, which every token needs whole.
COMPUTE_RULES = Rules(
    (
        ("experts", None),
        ("batch", "data"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("router", None),
        ("layers", "pipe"),
        ("embed", None),
        ("head_dim", None),
        ("positions", None),
        ("rotary", None),
        ("seq", None),
    )
)

# ZeRO storage: the compute layout plus a ``data`` shard on the first dim of each compute shard that
# it divides. For ``[out, in]`` weights that is dim 0, so a storage block is a run of whole rows of
# the compute shard: the all-gather of the blocks writes the compute shard in place (no unpacking
# copy) and the reduce-scatter reads the gradient as it is (no packing copy).
STORAGE_RULES = Rules(COMPUTE_RULES.table, fallback="data")


def spec_for(
    axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, rules: Rules, *, path: str = "tensor"
) -> PartitionSpec:
    """The spec of one tensor with logical ``axes`` and global ``shape`` (``path`` names it in errors)."""
    shape = tuple(int(d) for d in shape)
    if len(axes) != len(shape):
        raise ValueError(f"{path}: logical axes {axes} and shape {shape} differ in rank")
    unknown = sorted({name for name in axes if name is not None and name not in rules.names})
    if unknown:
        raise ValueError(
            f"{path}: no rule for logical axes {unknown} (axes {axes}); add them to the rules table"
        )
    decided: list[tuple[str, ...] | None] = [None if name is None else () for name in axes]
    undecided = {dim for dim, name in enumerate(axes) if name is not None}
    used: set[str] = set()
    for name, target in rules.table:
        targets = _as_axes(target)
        for dim in sorted(d for d in undecided if axes[d] == name):
            if used.isdisjoint(targets):
                decided[dim] = targets
                used.update(targets)
                undecided.discard(dim)
    spec = PartitionSpec(*[entry or None for entry in decided])
    for dim, name in enumerate(axes):
        parts = mesh.size(spec.axes(dim))
        if shape[dim] % parts:
            raise ValueError(
                f"{path}: dim {dim} ({name!r}) of size {shape[dim]} cannot be split over mesh axes "
                f"{spec.axes(dim)} ({parts} ranks): {shape[dim]} is not divisible by {parts}; pad it, "
                f"or put a rule ({name!r}, None) before the one that splits it"
            )
    return _with_fallback(spec, shape, mesh, rules.fallback)


def assign(operands: Sequence[tuple[str, ...]], rules: Rules, *, what: str = "op") -> dict[str, tuple[str, ...]]:
    """The mesh axes of every logical name of an operation whose operands (and results) have these
    dims: one answer per name, so every operand agrees on how a shared dim is split.

    The table is visited in order; a rule gives its axes to its name when they are free in every
    operand that has the name (a mesh axis splits at most one dim of a tensor). So ``seq`` next to
    ``heads`` in the attention projections stays whole, while the residual stream alone may split it.
    A name no rule mentions is an error naming it; names left undecided are replicated (``()``).
    """
    names = {name for dims in operands for name in dims}
    unknown = sorted(names - rules.names)
    if unknown:
        raise ValueError(f"{what}: no rule for logical dims {unknown} (dims {list(operands)}); add them to the rules")
    decided: dict[str, tuple[str, ...]] = {}
    used = [set() for _ in operands]
    for name, target in rules.table:
        if name not in names or name in decided:
            continue
        axes = _as_axes(target)
        holders = [i for i, dims in enumerate(operands) if name in dims]
        if all(used[i].isdisjoint(axes) for i in holders):
            decided[name] = axes
            for i in holders:
                used[i].update(axes)
    return {name: decided.get(name, ()) for name in names}


def _with_fallback(
    spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, axis: str | None
) -> PartitionSpec:
    if axis is None or axis in spec.used_axes or mesh.size(axis) == 1:
        return spec
    local = local_shape(shape, spec, mesh)
    for dim, size in enumerate(local):
        if size % mesh.size(axis) == 0:
            entries = list(spec)
            entries[dim] = spec.axes(dim) + (axis,)  # minor: shards nest inside the table's blocks
            return PartitionSpec(*entries)
    return spec


def _is_shape(node) -> bool:
    return isinstance(node, tuple) and all(isinstance(d, int) for d in node)


def resolve(axes_tree, shapes_tree, mesh: Mesh, rules: Rules | tuple):
    """Tree of :class:`PartitionSpec` for a tree of logical axes and a same-structure tree of shapes
    (tuples, ``torch.Size`` or tensors: anything with the global shape)."""
    rules = rules if isinstance(rules, Rules) else Rules(tuple(rules))
    shapes = {
        path: tuple(getattr(value, "shape", value))
        for path, value in tree.leaves_with_path(shapes_tree, is_leaf=_is_shape)
    }

    def resolve_leaf(path: str, axes: tuple) -> PartitionSpec:
        if path not in shapes:
            raise ValueError(f"{path}: in the axes tree but not in the shapes tree")
        return spec_for(axes, shapes[path], mesh, rules, path=path)

    specs = tree.map_with_path(resolve_leaf, axes_tree, is_leaf=tree.is_axes)
    extra = set(shapes) - {path for path, _ in tree.leaves_with_path(axes_tree, is_leaf=tree.is_axes)}
    if extra:
        raise ValueError(f"{sorted(extra)[0]}: in the shapes tree but not in the axes tree")
    return specs
