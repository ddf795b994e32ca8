"""Placements of activations and the collectives that move between them: the lowering table.

A :class:`Placement` says how one tensor is spread over the mesh: per dim, the mesh axes that split
it (major first), and the axes over which every rank holds a *partial sum* (the value is the sum
of the ranks' tensors). :func:`transitions` lowers a change of placement to collectives, one mesh
axis at a time:

=========================  ===========================  =================================
from (along axis ``a``)    to                           collective
=========================  ===========================  =================================
partial sums               dim ``d`` split over ``a``   reduce-scatter along ``d``
partial sums               replicated                   all-reduce
dim ``d`` split            replicated                   all-gather along ``d``
dim ``d`` split            dim ``e`` split              all-to-all (``d`` -> ``e``)
replicated                 dim ``d`` split              split (a local slice)
=========================  ===========================  =================================

:func:`relayout` runs the forward transitions and, in backward, the transitions of the gradient:
from the destination's dims with ``grad_partial`` (the axes over which the consumer left partial
gradient sums, e.g. a matmul whose weight is split over heads) back to the source's dims. So an
all-gather is followed in backward by a reduce-scatter when the gradient arrives as partial sums
and by a split when it arrives whole: the backward is derived, not paired by hand.

On an abstract mesh (planning) no collective runs: tensors are ``meta`` and only their shapes
change, and each collective is appended to a trace (kind, mesh axis, bytes) instead.

A :class:`fastllm.nn.ops.Ragged` value (tokens routed to experts) takes the same steps, run cell
by cell with variable sizes by :mod:`fastllm.sharding.ragged`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from fastllm.nn.ops import Ragged
from fastllm.sharding import collectives as C
from fastllm.sharding import ragged
from fastllm.sharding.mesh import Mesh

__all__ = ["Placement", "Step", "Collective", "transitions", "run", "relayout"]


@dataclass(frozen=True)
class Placement:
    """``dims[i]``: the mesh axes splitting dim ``i`` (major first); ``partial``: axes over which the
    ranks' tensors are summands of the value."""

    dims: tuple[tuple[str, ...], ...]
    partial: frozenset[str] = frozenset()

    def dim_of(self, axis: str) -> Optional[int]:
        return next((d for d, axes in enumerate(self.dims) if axis in axes), None)

    @property
    def axes(self) -> frozenset[str]:
        """Every mesh axis this placement uses (split or partial)."""
        return frozenset(a for axes in self.dims for a in axes) | self.partial

    def __str__(self) -> str:
        dims = ", ".join("+".join(axes) if axes else "-" for axes in self.dims)
        return f"({dims})" + (f" partial over {'+'.join(sorted(self.partial))}" if self.partial else "")


@dataclass(frozen=True)
class Step:
    """One collective along one mesh axis: ``kind`` with its tensor dim(s)."""

    kind: str  # all_reduce | reduce_scatter | all_gather | split | all_to_all
    axis: str
    dim: Optional[int] = None
    to_dim: Optional[int] = None  # all_to_all: the dim that ends up split


@dataclass
class Collective:
    """A collective a (planned) step would run: for traces and docs."""

    kind: str
    axis: str
    bytes: int
    what: str = ""


@functools.lru_cache(maxsize=4096)  # placements are few and immutable: a pure function of them
def transitions(src: Placement, dst: Placement) -> tuple[Step, ...]:
    """The collectives that turn a tensor placed as ``src`` into one placed as ``dst`` (in order)."""
    if len(src.dims) != len(dst.dims):
        raise ValueError(f"cannot relayout between placements of {len(src.dims)} and {len(dst.dims)} dims")
    if dst.partial - src.partial:
        raise ValueError(f"cannot make partial sums over {sorted(dst.partial - src.partial)} ({src} -> {dst})")
    current = [list(axes) for axes in src.dims]
    steps: list[Step] = []

    def prefix_of_dst(d: int) -> bool:
        return tuple(current[d]) == dst.dims[d][:len(current[d])]

    for axis in sorted(src.partial - dst.partial):  # partial sums first: they need every summand
        d = dst.dim_of(axis)
        if d is not None and dst.dims[d][:len(current[d]) + 1] == (*current[d], axis):
            steps.append(Step("reduce_scatter", axis, d))
            current[d].append(axis)
        else:
            steps.append(Step("all_reduce", axis))
    for d in range(len(current)):  # unsplit what dst splits otherwise, minor axes first
        while current[d] and not prefix_of_dst(d):
            axis = current[d].pop()
            e = dst.dim_of(axis)
            if e is not None and e != d and dst.dims[e][:len(current[e]) + 1] == (*current[e], axis):
                steps.append(Step("all_to_all", axis, d, e))
                current[e].append(axis)
            else:
                steps.append(Step("all_gather", axis, d))
    for d, axes in enumerate(dst.dims):  # split what dst splits and src did not, major axes first
        for axis in axes[len(current[d]):]:
            if any(axis in held for held in current):
                raise NotImplementedError(f"relayout {src} -> {dst}: axis {axis!r} nests differently")
            steps.append(Step("split", axis, d))
            current[d].append(axis)
    if tuple(map(tuple, current)) != dst.dims:
        raise NotImplementedError(f"relayout {src} -> {dst}: nested splits in another order")
    return tuple(steps)


def _shape_after(shape: list[int], step: Step, n: int) -> list[int]:
    shape = list(shape)
    if step.kind in ("reduce_scatter", "split"):
        shape[step.dim] //= n
    elif step.kind == "all_gather":
        shape[step.dim] *= n
    elif step.kind == "all_to_all":
        shape[step.dim] *= n
        shape[step.to_dim] //= n
    return shape


def _run_one(x: Tensor, step: Step, mesh: Mesh) -> Tensor:
    if step.kind == "all_reduce":
        return C._all_reduce(x, step.axis, mesh)
    if step.kind == "reduce_scatter":
        return C._reduce_scatter(x, step.dim, step.axis, mesh)
    if step.kind == "all_gather":
        return C._gather(x, step.dim, step.axis, mesh)
    if step.kind == "split":
        return C._split(x, step.dim, step.axis, mesh)
    return C._all_to_all(x, step.to_dim, step.dim, step.axis, mesh)


def run(x: Tensor | Ragged, steps: tuple[Step, ...], mesh: Mesh, trace: Optional[list] = None,
        what: str = "") -> Tensor | Ragged:
    """Apply ``steps`` to ``x`` (no autograd). On an abstract mesh only the shape changes (meta) and
    each collective is appended to ``trace``."""
    if isinstance(x, Ragged):
        return ragged.run(x, steps, mesh, trace, what)
    for step in steps:
        n = mesh.size(step.axis)
        if step.dim is not None and step.kind in ("reduce_scatter", "split") and x.shape[step.dim] % n:
            raise ValueError(f"{what or 'relayout'}: dim {step.dim} of shape {tuple(x.shape)} cannot be split "
                             f"over mesh axis {step.axis!r} ({n} ranks)")
        if trace is not None and step.kind != "split":
            trace.append(Collective(step.kind, step.axis, x.numel() * x.element_size(), what))
        if mesh.is_abstract:
            x = x.new_empty(_shape_after(list(x.shape), step, n), device="meta")
        else:
            x = _run_one(x, step, mesh)
    return x


class _Relayout(torch.autograd.Function):
    @staticmethod
    def forward(x, mesh, forward_steps, backward_steps, trace, what):
        return run(x, forward_steps, mesh, trace, what)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.mesh, _, ctx.backward_steps, _, ctx.what = inputs

    @staticmethod
    def backward(ctx, grad):
        return run(grad.contiguous(), ctx.backward_steps, ctx.mesh, None, ctx.what), None, None, None, None, None


@torch.compiler.disable
def relayout(
    x: Tensor | Ragged,
    src: Placement,
    dst: Placement,
    mesh: Mesh,
    *,
    grad_partial: frozenset[str] = frozenset(),
    trace: Optional[list] = None,
    what: str = "",
) -> Tensor | Ragged:
    """``x`` (placed as ``src``) placed as ``dst``; its gradient arrives placed as ``dst`` with partial
    sums over ``grad_partial`` and leaves placed as ``src``'s dims (whole values: the gradient of a
    partial sum is the gradient of each summand)."""
    forward = transitions(src, dst)
    backward = transitions(Placement(dst.dims, frozenset(grad_partial)), Placement(src.dims))
    if isinstance(x, Ragged):
        return ragged.relayout(x, forward, backward, mesh, trace, what)
    if trace is not None and mesh.is_abstract:  # planning: the forward's collectives, then the backward's
        out = run(x, forward, mesh, trace, what)
        if x.is_floating_point():
            run(out, backward, mesh, trace, f"{what}, backward")
        if out is not x and x.requires_grad:  # a fresh meta tensor: keep "needs a gradient" (pipeline carries)
            out.requires_grad_(True)
        return out
    if not x.requires_grad:
        return run(x, forward, mesh, trace, what)
    if not forward and not backward:
        return x
    return _Relayout.apply(x, mesh, forward, backward, trace, what)
