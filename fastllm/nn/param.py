"""Parameter declarations: shape, logical axes and initializer of every weight, in one place.

A layer declares its weights as a tree of :class:`Param` (its ``params`` function) and computes with
a matching tree of tensors (its ``apply`` function). From the declaration tree we derive, without
duplication:

* ``init(specs, key)``: the tensors, each drawn from ``fold_in(key, path)`` so a value depends only
  on (seed, path), never on creation order or on the device layout;
* ``axes(specs)``: the logical dimension names, the single source of truth for sharding;
* ``init(specs, key, device="meta")``: shapes only, for 7B presets that must not allocate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Callable

import torch

from fastllm import random, tree

__all__ = [
    "Param",
    "Initializer",
    "normal",
    "zeros",
    "ones",
    "constant",
    "init",
    "axes",
    "shapes",
    "is_param",
    "count",
]

# (key, shape) -> float32 CPU tensor
Initializer = Callable[[random.Key, tuple[int, ...]], torch.Tensor]


def normal(std: float) -> Initializer:
    """N(0, std^2)."""
    if not std >= 0:
        raise ValueError(f"normal initializer needs std >= 0, got {std}")
    return _Normal(float(std))


@dataclass(frozen=True)
class _Normal:
    std: float

    def __call__(self, k: random.Key, shape: tuple[int, ...]) -> torch.Tensor:
        return random.normal(k, shape, self.std)


@dataclass(frozen=True)
class _Constant:
    value: float

    def __call__(self, k: random.Key, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.full(shape, self.value, dtype=torch.float32)


def constant(value: float) -> Initializer:
    return _Constant(float(value))


def zeros() -> Initializer:
    return _Constant(0.0)


def ones() -> Initializer:
    return _Constant(1.0)


@dataclass(frozen=True)
class Param:
    """One weight: its global shape, a logical name per dimension, and how to initialise it."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    initializer: Initializer = field(default_factory=zeros)

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "axes", tuple(self.axes))
        if len(self.shape) != len(self.axes):
            raise ValueError(f"Param shape {self.shape} and axes {self.axes} differ in rank")
        if any(d <= 0 for d in self.shape):
            raise ValueError(f"Param shape {self.shape} has a non-positive dimension")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def is_param(node) -> bool:
    return isinstance(node, Param)


def init(
    specs,
    key: random.Key,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
):
    """Materialise a tree of :class:`Param` into tensors (``device="meta"``: shapes only)."""

    def make(path: str, spec: Param) -> torch.Tensor:
        if torch.device(device).type == "meta":
            return torch.empty(spec.shape, dtype=dtype, device="meta")
        value = spec.initializer(random.fold_in(key, path), spec.shape)
        return value.to(device=device, dtype=dtype)

    return tree.map_with_path(make, specs, is_leaf=is_param)


def axes(specs):
    """The same tree with each leaf's tuple of logical dimension names."""
    return tree.map(lambda spec: spec.axes, specs, is_leaf=is_param)


def shapes(specs):
    return tree.map(lambda spec: spec.shape, specs, is_leaf=is_param)


def count(specs) -> int:
    """Number of scalars declared by a tree of :class:`Param`."""
    return sum(spec.numel for spec in tree.leaves(specs, is_leaf=is_param))
