"""The lowering table on ragged tensors: tokens routed to experts move as cells of rows.

A :class:`fastllm.nn.ops.Ragged` is ``counts`` (one entry per cell: which expert, and from which
block of the token dims) and ``rows`` (the cells' rows one cell after another, cells in row-major
order of ``counts``). Its placement is a dense one over its dims: the group dims (those of
``counts``) and the row dims. Every step of :func:`fastllm.sharding.placement.transitions` on a
group dim moves the counts exactly as it moves a dense tensor (they are one), and the rows follow
their cells, so a layout derives expert parallelism's moves from the same table:

===================  ==================================================================
step (group dim)     on the rows
===================  ==================================================================
all-to-all d -> e    counts exchanged first (an all-to-all of ``counts``), then one
                     all-to-all with variable splits: to rank ``j`` the cells of its
                     block of ``e``; the received cells reordered into row-major order
all-gather d         counts gathered first, then every rank's rows to every rank
split d              the cells of this rank's block, no communication
all-reduce           the rows summed (the ranks hold the same cells)
reduce-scatter d     all-reduce, then split
===================  ==================================================================

With tokens split over ``data`` by ``batch`` and experts over ``data`` by ``experts``, the move of
the dispatched tokens is the all-to-all ``batch -> experts``: expert parallelism's dispatch
(GShard, Lepikhin et al. 2020), without padding to a capacity (MegaBlocks, Gale et al. 2023).
Steps along a row dim are refused (no layout splits a routed row).

Split sizes are host integers (``torch.distributed`` takes lists), so each exchange syncs with the
host once, after its counts arrive. On an abstract mesh (planning) only shapes change and the rows
are counted as if routing were balanced.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fastllm.nn.ops import Ragged
from fastllm.sharding import collectives as C
from fastllm.sharding.mesh import Mesh

__all__ = ["run", "relayout"]


# --- cells and their rows --------------------------------------------------------------------------
def _numbers(shape: torch.Size, device: torch.device) -> Tensor:
    """Each cell's number in row-major order, laid out in the cells' shape."""
    return torch.arange(shape.numel(), device=device).view(shape)


def _rows_of(counts: Tensor, cells: Tensor, total: Optional[int] = None) -> Tensor:
    """Indices of the rows of ``cells`` (numbers into the flattened ``counts``, whose rows lie cell
    after cell), cell after cell: the gather that puts the cells in that order. ``total``: their
    number of rows when known (saves a host sync)."""
    counts = counts.reshape(-1)
    starts = torch.cumsum(counts, 0) - counts
    lengths = counts.index_select(0, cells)
    offsets = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum()) if total is None else total
    shift = torch.repeat_interleave(starts.index_select(0, cells) - offsets, lengths, output_size=total)
    return shift + torch.arange(total, device=counts.device)


def _received(blocks: Tensor, rows: Tensor, dim: int) -> Ragged:
    """Rows received from every peer (peer after peer, each peer's cells ``blocks[peer]`` in
    row-major order) as the ragged tensor of the blocks concatenated along ``dim``."""
    order = torch.cat(_numbers(blocks.shape, blocks.device).unbind(0), dim=dim).reshape(-1)
    counts = torch.cat(blocks.unbind(0), dim=dim)
    return Ragged(rows.index_select(0, _rows_of(blocks, order, rows.shape[0])), counts)


def _exchange(rows: Tensor, send: list[int], receive: list[int], axis: str, mesh: Mesh) -> Tensor:
    """All-to-all with variable splits along dim 0 (``send[j]`` rows to peer ``j``)."""
    out = rows.new_empty((sum(receive), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), receive, send, group=mesh.group(axis))
    return out


# --- the steps ---------------------------------------------------------------------------------------
def _split(x: Ragged, dim: int, axis: str, mesh: Mesh) -> Ragged:
    n, me = mesh.size(axis), mesh.rank(axis)
    cells = _numbers(x.counts.shape, x.counts.device).chunk(n, dim)[me].reshape(-1)
    return Ragged(x.rows.index_select(0, _rows_of(x.counts, cells)), x.counts.chunk(n, dim)[me].contiguous())


def _all_gather(x: Ragged, dim: int, axis: str, mesh: Mesh) -> Ragged:
    n = mesh.size(axis)
    blocks = C._gather(x.counts.unsqueeze(0), 0, axis, mesh)  # [peers, *counts]
    receive = blocks.reshape(n, -1).sum(1).tolist()
    sent = x.rows.expand(n, *x.rows.shape).reshape(-1, *x.rows.shape[1:])  # every row to every peer
    return _received(blocks, _exchange(sent, [x.rows.shape[0]] * n, receive, axis, mesh), dim)


def _all_to_all(x: Ragged, dim: int, to_dim: int, axis: str, mesh: Mesh) -> Ragged:
    """``dim`` becomes whole, ``to_dim`` split: peer ``j`` gets the cells of block ``j`` of ``to_dim``."""
    n = mesh.size(axis)
    outgoing = torch.stack(x.counts.chunk(n, to_dim))  # [peers, *block]
    blocks = C._all_to_all0(outgoing.contiguous(), mesh.group(axis), n)  # the counts first: [peers, *block]
    sizes = torch.stack([outgoing.reshape(n, -1).sum(1), blocks.reshape(n, -1).sum(1)]).tolist()
    cells = torch.cat([c.reshape(-1) for c in _numbers(x.counts.shape, x.counts.device).chunk(n, to_dim)])
    sent = x.rows.index_select(0, _rows_of(x.counts, cells, x.rows.shape[0]))  # peer after peer
    return _received(blocks, _exchange(sent, sizes[0], sizes[1], axis, mesh), dim)


def _all_reduce(x: Ragged, axis: str, mesh: Mesh) -> Ragged:
    return Ragged(C._all_reduce(x.rows, axis, mesh), x.counts)


def _run_one(x: Ragged, step, mesh: Mesh) -> Ragged:
    if step.kind == "all_reduce":
        return _all_reduce(x, step.axis, mesh)
    if step.kind == "reduce_scatter":
        return _split(_all_reduce(x, step.axis, mesh), step.dim, step.axis, mesh)
    if step.kind == "all_gather":
        return _all_gather(x, step.dim, step.axis, mesh)
    if step.kind == "split":
        return _split(x, step.dim, step.axis, mesh)
    return _all_to_all(x, step.dim, step.to_dim, step.axis, mesh)


def _planned(x: Ragged, step, n: int) -> Ragged:
    """The shapes after ``step`` on ``meta`` tensors, rows counted as for balanced routing."""
    counts, rows = list(x.counts.shape), x.rows.shape[0]
    if step.kind in ("split", "reduce_scatter"):
        counts[step.dim] //= n
        rows //= n
    elif step.kind == "all_gather":
        counts[step.dim] *= n
        rows *= n
    elif step.kind == "all_to_all":
        counts[step.dim] *= n
        counts[step.to_dim] //= n
    meta = dict(device="meta")
    return Ragged(x.rows.new_empty((rows, *x.rows.shape[1:]), **meta), x.counts.new_empty(counts, **meta))


def _check(x: Ragged, step, n: int, what: str) -> None:
    groups = x.counts.ndim
    if step.dim is not None and max(step.dim, step.to_dim or 0) >= groups:
        raise NotImplementedError(f"{what}: a ragged tensor moves along its group dims only (it has {groups}); "
                                  f"{step.kind} over {step.axis!r} would split dim {step.dim} of its rows")
    cut = step.to_dim if step.kind == "all_to_all" else step.dim if step.kind in ("split", "reduce_scatter") else None
    if cut is not None and x.counts.shape[cut] % n:
        raise ValueError(f"{what}: group dim {cut} of a ragged tensor holds {x.counts.shape[cut]} blocks of cells, "
                         f"which cannot be split over mesh axis {step.axis!r} ({n} ranks): a ragged dim is only "
                         "split where the rows were made split")


def run(x: Ragged, steps: tuple, mesh: Mesh, trace: Optional[list] = None, what: str = "") -> Ragged:
    """Apply the lowering ``steps`` to ``x`` (no autograd); on an abstract mesh only the shapes."""
    from fastllm.sharding.placement import Collective

    for step in steps:
        n = mesh.size(step.axis)
        _check(x, step, n, what or "relayout")
        if trace is not None and step.kind != "split":
            trace.append(Collective(step.kind, step.axis, x.rows.numel() * x.rows.element_size(),
                                    f"{what} (ragged: counts, then rows)"))
        x = _planned(x, step, n) if mesh.is_abstract else _run_one(x, step, mesh)
    return x


class _Relayout(torch.autograd.Function):
    """The rows' gradient comes back placed as the result, with its counts, and goes back by the
    backward steps (derived, as for dense tensors, by :func:`transitions`)."""

    @staticmethod
    def forward(rows, counts, mesh, forward_steps, backward_steps, trace, what):
        out = run(Ragged(rows, counts), forward_steps, mesh, trace, what)
        # autograd saves no input returned as it is (an all-reduce keeps the counts): a view of it
        return out.rows, out.counts.view_as(out.counts) if out.counts is counts else out.counts

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, ctx.mesh, _, ctx.backward_steps, _, ctx.what = inputs
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad, _):
        (counts,) = ctx.saved_tensors
        back = run(Ragged(grad.contiguous(), counts), ctx.backward_steps, ctx.mesh, None, f"{ctx.what}, backward")
        return back.rows, None, None, None, None, None, None


def relayout(x: Ragged, forward: tuple, backward: tuple, mesh: Mesh, trace: Optional[list], what: str) -> Ragged:
    """:func:`fastllm.sharding.placement.relayout` of a ragged tensor (its steps already lowered)."""
    if trace is not None and mesh.is_abstract:  # planning: the forward's collectives, then the backward's
        out = run(x, forward, mesh, trace, what)
        run(out, backward, mesh, trace, f"{what}, backward")
        return out
    if not x.rows.requires_grad:
        return run(x, forward, mesh, trace, what)
    return Ragged(*_Relayout.apply(x.rows, x.counts, mesh, forward, backward, trace, what))
