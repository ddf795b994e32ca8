"""``PartitionSpec``: for each tensor dim, the mesh axes it is split over (or ``None``: replicated).

A spec is a tuple with one entry per dim: ``None``, a mesh axis name, or a tuple of axis names
(the dim is split over their product; the first axis is the major one, as in JAX). A mesh axis
appears at most once per spec. Along the axes a spec does not name, the tensor is replicated.

Shards are contiguous blocks: along a dim split over axes ``(a, b)``, the rank at coordinates
``(i, j)`` holds block ``i * size(b) + j`` of ``size(a) * size(b)`` equal blocks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastllm.sharding import collectives
from fastllm.sharding.mesh import AXES, Mesh

__all__ = ["PartitionSpec", "is_spec", "local_shape", "shard", "unshard"]


class PartitionSpec(tuple):
    """``PartitionSpec("tensor", None)``: dim 0 split over ``tensor``, dim 1 replicated."""

    def __new__(cls, *entries: str | tuple[str, ...] | None) -> "PartitionSpec":
        normalised = tuple(_normalise(entry) for entry in entries)
        used = [axis for entry in normalised for axis in _as_axes(entry)]
        repeated = sorted({axis for axis in used if used.count(axis) > 1})
        if repeated:
            raise ValueError(f"PartitionSpec{tuple(entries)} uses mesh axes {repeated} more than once")
        return super().__new__(cls, normalised)

    def axes(self, dim: int) -> tuple[str, ...]:
        """The mesh axes that split ``dim`` (empty when replicated)."""
        return _as_axes(self[dim])

    @property
    def used_axes(self) -> tuple[str, ...]:
        return tuple(axis for dim in range(len(self)) for axis in self.axes(dim))

    def __repr__(self) -> str:
        return f"PartitionSpec{tuple.__repr__(self)}"

    def __reduce__(self):
        return (PartitionSpec, tuple(self))


def is_spec(node) -> bool:
    """True for a :class:`PartitionSpec`, a leaf of a spec tree."""
    return isinstance(node, PartitionSpec)


def _normalise(entry):
    if entry is None:
        return None
    if isinstance(entry, str):
        entry = (entry,)
    if not isinstance(entry, tuple) or not all(isinstance(axis, str) for axis in entry):
        raise TypeError(f"a PartitionSpec entry is None, a mesh axis or a tuple of axes, got {entry!r}")
    unknown = [axis for axis in entry if axis not in AXES]
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown} in a PartitionSpec; the mesh axes are {AXES}")
    if not entry:
        return None
    return entry[0] if len(entry) == 1 else entry


def _as_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else entry


def _check_rank(shape: tuple[int, ...], spec: PartitionSpec, name: str) -> None:
    if len(shape) != len(spec):
        raise ValueError(
            f"{name}: spec {spec!r} has {len(spec)} entries but the shape {shape} has {len(shape)} dims"
        )


def local_shape(
    global_shape: tuple[int, ...] | torch.Size, spec: PartitionSpec, mesh: Mesh, *, name: str = "tensor"
) -> tuple[int, ...]:
    """The shape of one rank's shard; an error names ``name``, the dim and sizes if one does not divide."""
    shape = tuple(int(d) for d in global_shape)
    _check_rank(shape, spec, name)
    local = []
    for dim, size in enumerate(shape):
        parts = math.prod(mesh.size(axis) for axis in spec.axes(dim))
        if size % parts:
            raise ValueError(
                f"{name}: dim {dim} of size {size} cannot be split over mesh axes {spec.axes(dim)} "
                f"({parts} ranks): {size} is not divisible by {parts}"
            )
        local.append(size // parts)
    return tuple(local)


def shard(tensor: Tensor, spec: PartitionSpec, mesh: Mesh, *, name: str = "tensor") -> Tensor:
    """This rank's block of a global ``tensor`` (a fresh contiguous copy: the global may be freed)."""
    local = local_shape(tensor.shape, spec, mesh, name=name)
    for dim, size in enumerate(local):
        axes = spec.axes(dim)
        if axes:
            tensor = tensor.narrow(dim, mesh.rank(axes) * size, size)
    return tensor.clone(memory_format=torch.contiguous_format)


def unshard(local: Tensor, spec: PartitionSpec, mesh: Mesh) -> Tensor:
    """Gather shards back into the global tensor on every rank (autograd: reduce-scatter backward).

    Along a dim split over ``(a, b)`` the minor axis ``b`` is gathered first, so blocks land in the
    order :func:`shard` cut them.
    """
    _check_rank(tuple(local.shape), spec, "unshard")
    for dim in range(local.ndim):
        for axis in reversed(spec.axes(dim)):
            local = collectives.all_gather(local, dim, axis, mesh)
    return local
