"""The sharded-checkpoint layout, shared by the writer and the reader: the index's format and spec
encoding, the block each rank holds, which ranks write a block, the spec tree of an optimizer state."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Optional, Union

import optree
from torch import Tensor

from fastllm import tree
from fastllm.checkpoint.store import CheckpointError
from fastllm.sharding.mesh import AXES, Mesh
from fastllm.sharding.spec import PartitionSpec, is_spec, local_shape
from fastllm.tree import PyTree

__all__ = ["FORMAT", "INDEX", "PathLike", "SCALARS", "state_specs", "spec_to_json", "spec_from_json", "rank_block",
           "writer_ranks",
           "shard_file", "flat_specs", "check_paths"]

FORMAT = "fastllm.sharded-checkpoint/1"
INDEX = "sharded.json"
SCALARS = (bool, int, float, str)

PathLike = Union[str, os.PathLike]


def spec_to_json(spec: PartitionSpec) -> list:
    return [list(entry) if isinstance(entry, tuple) else entry for entry in spec]


def spec_from_json(entries: list) -> PartitionSpec:
    return PartitionSpec(*[tuple(entry) if isinstance(entry, list) else entry for entry in entries])


def rank_block(global_shape: list[int], spec: PartitionSpec, mesh: Mesh, name: str) -> tuple[list, list]:
    """(start, shape) of the block of a global tensor that ``mesh``'s rank holds under ``spec``."""
    shape = list(local_shape(tuple(global_shape), spec, mesh, name=name))
    start = [mesh.rank(spec.axes(dim)) * size if spec.axes(dim) else 0 for dim, size in enumerate(shape)]
    return start, shape


def writer_ranks(spec: PartitionSpec, mesh_shape: dict[str, int], at: Optional[dict[str, int]] = None) -> list[int]:
    """The ranks that write a block: coordinate 0 along every axis the spec does not split over, or
    the coordinate ``at`` gives for that axis (a tensor held by one pipeline stage: ``{"pipe": 2}``)."""
    plan, at = Mesh.abstract(**mesh_shape), at or {}
    unused = [axis for axis in AXES if axis not in spec.used_axes]
    return [r for r in range(plan.world_size) if all(plan.coords_of(r)[a] == at.get(a, 0) for a in unused)]


def shard_file(rank: int) -> str:
    return f"shard-{rank:05d}.safetensors"


def state_specs(state: PyTree, param_specs: PyTree) -> PyTree:
    """The spec tree of an optimizer state: ``param_specs`` for each params-shaped subtree (the
    moments), replicated specs for the other tensors (the step count) and for Python scalars."""
    params_def = optree.tree_structure(param_specs, is_leaf=is_spec)

    def walk(node: Any) -> Any:
        if isinstance(node, Tensor):
            return PartitionSpec(*[None] * node.ndim)
        if isinstance(node, SCALARS) or node is None:
            return PartitionSpec()
        if optree.tree_structure(node) == params_def:
            return param_specs
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(walk(child) for child in node))
        if isinstance(node, (tuple, list)):
            return type(node)(walk(child) for child in node)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        raise TypeError(f"optimizer state node of type {type(node).__name__} is not a tensor, scalar or container")

    return walk(state)


def flat_specs(name: str, specs: PyTree, paths: Iterable[str]) -> dict[str, PartitionSpec]:
    """The spec of each leaf path of the tree ``name``; a mismatch names the paths.

    A 0-d spec where the tree has no leaf is dropped: resolving ``optim.state_axes`` gives an empty
    state (``EmptyState()``, a 0-field tuple) the spec ``PartitionSpec()``.
    """
    flat = tree.flatten(specs, is_leaf=is_spec)
    wrong = [path for path, spec in flat.items() if not is_spec(spec)]
    if wrong:
        raise TypeError(f"spec tree {name!r}: leaves {wrong[:5]} are not PartitionSpecs")
    paths = list(paths)
    flat = {p: s for p, s in flat.items() if p in set(paths) or len(s) != 0}
    check_paths(f"tree {name!r} and its spec tree", ("the tree", paths), ("the spec tree", flat))
    return {path: flat[path] for path in paths}


def check_paths(what: str, first: tuple[str, Iterable[str]], second: tuple[str, Iterable[str]]) -> None:
    """Raise, naming the paths, when two labelled sets of paths differ."""
    (a, a_paths), (b, b_paths) = first, second
    a_paths, b_paths = set(a_paths), set(b_paths)
    if a_paths != b_paths:
        raise CheckpointError(f"{what} do not match: only in {a}: {sorted(a_paths - b_paths)[:5] or 'none'}; "
                              f"only in {b}: {sorted(b_paths - a_paths)[:5] or 'none'}")


