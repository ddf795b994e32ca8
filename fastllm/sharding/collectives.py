"""Collectives over one mesh axis: the raw ones (no autograd) that placements lower to, and the
classic autograd-aware ones, each a relayout between two placements whose backward is derived.

======================  =================================  =====================================
function                forward                            backward
======================  =================================  =====================================
``all_gather``          gather shards along ``dim``         reduce-scatter along ``dim``
``reduce_scatter``      sum over ranks, keep my ``dim``     all-gather along ``dim``
                        shard
``all_reduce``          sum over ranks (Megatron's *g*)    identity
``copy_to_parallel``    identity (Megatron's *f*)          all-reduce
``split``               keep my shard of ``dim``           all-gather along ``dim``
``all_to_all``          re-shard ``concat_dim`` ->          ``all_to_all`` back (``split_dim`` ->
                        ``split_dim``                      ``concat_dim``)
======================  =================================  =====================================

The pairs follow from the chain rule when the objective is the *sum over ranks* of what each rank
computes (Shoeybi et al. 2019, "Megatron-LM", sec. 3; Korthikanti et al. 2022, "Reducing Activation
Recomputation", sec. 4.2.2): a gradient arriving at an ``all_gather`` output is each rank's partial
contribution, so the shards' gradients are their sums; the gradient arriving at an ``all_reduce``
output is already the full one, so each summand receives it unchanged. Each function here says so
as (source placement, destination placement, partial gradient axes) and
:func:`fastllm.sharding.placement.relayout` derives both directions; model code reaches them only
through :mod:`fastllm.nn.ops`.

On an axis of size 1 every function is the identity, so single-device code pays nothing. NCCL gets
the single-buffer collectives (``all_gather_into_tensor``/``reduce_scatter_tensor``); a backend
that lacks one (old gloo) falls back to the list-based collective, and only then.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fastllm.sharding.mesh import Mesh

__all__ = ["all_gather", "reduce_scatter", "all_reduce", "copy_to_parallel", "split", "all_to_all"]

# torch >= 2.13 renamed the single-buffer collectives; older versions only have the first names.
_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_SCATTER_SINGLE = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --- raw collectives along dim 0 of a contiguous tensor (no autograd) --------------------------
def _unsupported(error: Exception, group) -> bool:
    """True when a backend refused an operation it does not implement (never on NCCL)."""
    if dist.get_backend(group) == "nccl":
        return False
    text = str(error).lower()
    return isinstance(error, NotImplementedError) or "support" in text or "implement" in text


def _gather0(x: Tensor, group, n: int) -> Tensor:
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))
    try:
        _GATHER_SINGLE(out, x, group=group)
    except (RuntimeError, NotImplementedError) as error:
        if not _unsupported(error, group):
            raise
        out = _gather0_by_list(x, group, n)
    return out


def _gather0_by_list(x: Tensor, group, n: int) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts)


def _reduce_scatter0(x: Tensor, group, n: int) -> Tensor:
    out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
    try:
        _SCATTER_SINGLE(out, x, group=group)
    except (RuntimeError, NotImplementedError) as error:
        if not _unsupported(error, group):
            raise
        out = _reduce_scatter0_by_all_reduce(x, group, n)
    return out


def _reduce_scatter0_by_all_reduce(x: Tensor, group, n: int) -> Tensor:
    """n times the traffic of a reduce-scatter: only for backends without one."""
    total = x.clone()
    dist.all_reduce(total, group=group)
    return total.chunk(n)[dist.get_rank(group)].clone()


def _all_to_all0(x: Tensor, group, n: int) -> Tensor:
    out = torch.empty_like(x)
    try:
        dist.all_to_all_single(out, x, group=group)
    except (RuntimeError, NotImplementedError) as error:
        if not _unsupported(error, group):
            raise
        out = _all_to_all0_by_list(x, group, n)
    return out


def _all_to_all0_by_list(x: Tensor, group, n: int) -> Tensor:
    parts = [torch.empty_like(part) for part in x.chunk(n)]
    dist.all_to_all(parts, [part.contiguous() for part in x.chunk(n)], group=group)
    return torch.cat(parts)


# --- the same along any dim ----------------------------------------------------------------------
def _check_divisible(x: Tensor, dim: int, n: int, op: str, axis: str) -> None:
    if x.shape[dim] % n:
        raise ValueError(
            f"{op} over mesh axis {axis!r} ({n} ranks) needs dim {dim} of shape {tuple(x.shape)} "
            f"to be divisible by {n}"
        )


def _gather(x: Tensor, dim: int, axis: str, mesh: Mesh) -> Tensor:
    moved = x.movedim(dim, 0).contiguous()  # [local_d, ...rest]
    gathered = _gather0(moved, mesh.group(axis), mesh.size(axis))  # [n * local_d, ...rest]
    return gathered.movedim(0, dim)


def _reduce_scatter(x: Tensor, dim: int, axis: str, mesh: Mesh) -> Tensor:
    _check_divisible(x, dim, mesh.size(axis), "reduce_scatter", axis)
    moved = x.movedim(dim, 0).contiguous()  # [n * local_d, ...rest]
    return _reduce_scatter0(moved, mesh.group(axis), mesh.size(axis)).movedim(0, dim)


def _all_reduce(x: Tensor, axis: str, mesh: Mesh) -> Tensor:
    total = x.contiguous().clone()
    dist.all_reduce(total, group=mesh.group(axis))
    return total


def _split(x: Tensor, dim: int, axis: str, mesh: Mesh) -> Tensor:
    _check_divisible(x, dim, mesh.size(axis), "split", axis)
    return x.chunk(mesh.size(axis), dim)[mesh.rank(axis)].contiguous()


def _all_to_all(x: Tensor, split_dim: int, concat_dim: int, axis: str, mesh: Mesh) -> Tensor:
    n = mesh.size(axis)
    _check_divisible(x, split_dim, n, "all_to_all", axis)
    blocks = torch.stack(x.chunk(n, split_dim))  # [n, ...]: block j goes to rank j
    received = _all_to_all0(blocks.contiguous(), mesh.group(axis), n)  # block i came from rank i
    return torch.cat(received.unbind(0), dim=concat_dim)


# --- public API: each a relayout between two placements (fastllm.sharding.placement) -------------
def _placement(ndim: int, split: dict[int, str] | None = None, partial: tuple[str, ...] = ()):
    from fastllm.sharding.placement import Placement

    split = split or {}
    return Placement(tuple((split[d],) if d in split else () for d in range(ndim)), frozenset(partial))


def _relayout(x: Tensor, src, dst, mesh: Mesh, grad_partial: tuple[str, ...] = ()) -> Tensor:
    from fastllm.sharding.placement import relayout

    return relayout(x, src, dst, mesh, grad_partial=frozenset(grad_partial))


def all_gather(x: Tensor, dim: int, axis: str, mesh: Mesh) -> Tensor:
    """Concatenate the shards of ``axis``'s ranks along ``dim`` (in rank order).

    Backward: reduce-scatter, i.e. each shard's gradient is the sum of every rank's gradient for it.
    """
    if mesh.size(axis) == 1:
        return x
    d = _dim(x, dim)
    return _relayout(x, _placement(x.ndim, {d: axis}), _placement(x.ndim), mesh, (axis,))


def reduce_scatter(x: Tensor, dim: int, axis: str, mesh: Mesh) -> Tensor:
    """Sum ``x`` over ``axis``'s ranks and keep this rank's shard of ``dim``. Backward: all-gather."""
    if mesh.size(axis) == 1:
        return x
    d = _dim(x, dim)
    _check_divisible(x, d, mesh.size(axis), "reduce_scatter", axis)
    return _relayout(x, _placement(x.ndim, partial=(axis,)), _placement(x.ndim, {d: axis}), mesh)


def all_reduce(x: Tensor, axis: str, mesh: Mesh) -> Tensor:
    """Sum of ``x`` over ``axis``'s ranks (partial sums in, replicated out).

    Backward: identity; the gradient of a replicated output is the gradient of every summand.
    """
    if mesh.size(axis) == 1:
        return x
    return _relayout(x, _placement(x.ndim, partial=(axis,)), _placement(x.ndim), mesh)


def copy_to_parallel(x: Tensor, axis: str, mesh: Mesh) -> Tensor:
    """Identity on a replicated ``x`` that each rank of ``axis`` will use differently (e.g. before
    a matmul with a weight split over ``axis``). Backward: all-reduce of the ranks' partial gradients.
    """
    if mesh.size(axis) == 1:
        return x
    return _relayout(x, _placement(x.ndim), _placement(x.ndim), mesh, (axis,))


def split(x: Tensor, dim: int, axis: str, mesh: Mesh) -> Tensor:
    """This rank's shard along ``dim`` of a replicated ``x``. Backward: all-gather."""
    if mesh.size(axis) == 1:
        return x
    d = _dim(x, dim)
    _check_divisible(x, d, mesh.size(axis), "split", axis)
    return _relayout(x, _placement(x.ndim), _placement(x.ndim, {d: axis}), mesh)


def all_to_all(x: Tensor, split_dim: int, concat_dim: int, axis: str, mesh: Mesh) -> Tensor:
    """Re-shard: cut ``split_dim`` into one block per rank, send block ``j`` to rank ``j``, and
    concatenate the received blocks along ``concat_dim`` in rank order (Ulysses' sequence <->
    heads exchange, expert dispatch). Backward: the inverse ``all_to_all``.

    With ``x`` this rank's block of a global tensor along ``concat_dim``, the result is its block
    along ``split_dim``. (``split_dim == concat_dim`` is allowed but is a block transpose.)
    """
    if mesh.size(axis) == 1:
        return x
    s, c = _dim(x, split_dim), _dim(x, concat_dim)
    _check_divisible(x, s, mesh.size(axis), "all_to_all", axis)
    if s == c:
        from fastllm.sharding.placement import Step, run

        return run(x, (Step("all_to_all", axis, c, s),), mesh)
    return _relayout(x, _placement(x.ndim, {c: axis}), _placement(x.ndim, {s: axis}), mesh)


def _dim(x: Tensor, dim: int) -> int:
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim {dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.ndim
