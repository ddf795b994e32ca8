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

Split sizes are host integers (``torch.distributed`` takes lists), so an exchange of counts waits
on the host once. A ragged tensor keeps a note of the steps that moved it (``route``: what each
exchanged), and the inverse of the last one (the combine after the dispatch, and every move in
backward) takes its counts and sizes from the note: one exchange of counts and one host wait per
round trip, not four. What can overlap does: the counts travel while the rows are put in peer
order, and the rows travel while the receiving order is computed.

On an abstract mesh (planning) only shapes change and the rows are counted as if routing were
balanced.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def _rows_of(counts: Tensor, cells: Tensor, total: int) -> Tensor:
    """Indices of the rows of ``cells`` (numbers into the flattened ``counts``, whose rows lie cell
    after cell), cell after cell, ``total`` rows: the gather that puts the cells in that order."""
    counts = counts.reshape(-1)
    starts = torch.cumsum(counts, 0) - counts
    lengths = counts.index_select(0, cells)
    offsets = torch.cumsum(lengths, 0) - lengths
    shift = torch.repeat_interleave(starts.index_select(0, cells) - offsets, lengths, output_size=total)
    return shift + torch.arange(total, device=counts.device)


def _in_order(blocks: Tensor, dim: int, total: int) -> tuple[Tensor, Tensor]:
    """(the counts of peer-major ``blocks`` concatenated along ``dim``, the gather that puts their
    ``total`` rows, received peer after peer, in that counts' row-major order)."""
    order = torch.cat(_numbers(blocks.shape, blocks.device).unbind(0), dim=dim).reshape(-1)
    return torch.cat(blocks.unbind(0), dim=dim), _rows_of(blocks, order, total)


def _sizes(blocks: Tensor) -> tuple[int, ...]:
    """Rows of each peer's block (a host wait)."""
    return tuple(blocks.reshape(blocks.shape[0], -1).sum(1).tolist())


def _exchange(rows: Tensor, send: tuple[int, ...], receive: tuple[int, ...], axis: str, mesh: Mesh):
    """Start the all-to-all with variable splits along dim 0 (``send[j]`` rows to peer ``j``):
    (the buffer it fills, its work)."""
    out = rows.new_empty((sum(receive), *rows.shape[1:]))
    work = dist.all_to_all_single(out, rows.contiguous(), list(receive), list(send), group=mesh.group(axis),
                                  async_op=True)
    return out, work


# --- the steps ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Record:
    """A step a ragged tensor took and what it exchanged: enough for the inverse step to run without
    exchanging counts (nor waiting on the host for their sizes)."""

    step: object  # fastllm.sharding.placement.Step
    sent: Optional[Tensor]  # counts blocks to each peer [peers, *block] (a split: every peer's block)
    received: Optional[Tensor]  # counts blocks from each peer [peers, *block] (planning: None)
    send: tuple[int, ...]  # rows to each peer (a split: each peer's rows)
    receive: tuple[int, ...]  # rows from each peer


def _undoes(step, done) -> bool:
    """Whether ``step`` is the inverse of ``done`` (each a lowering step)."""
    if step.axis != done.axis:
        return False
    if step.kind == "all_to_all" and done.kind == "all_to_all":
        return (step.dim, step.to_dim) == (done.to_dim, done.dim)
    if step.kind == "all_gather" and done.kind in ("split", "reduce_scatter"):
        return step.dim == done.dim
    return step.kind in ("split", "reduce_scatter") and done.kind == "all_gather" and step.dim == done.dim


def _split(x: Ragged, step, mesh: Mesh, undo: Optional[_Record]) -> tuple[Ragged, _Record]:
    n, me = mesh.size(step.axis), mesh.rank(step.axis)
    blocks = torch.stack(x.counts.chunk(n, step.dim))
    sizes = undo.receive if undo is not None else _sizes(blocks)  # after a gather: what each peer had
    cells = _numbers(x.counts.shape, x.counts.device).chunk(n, step.dim)[me].reshape(-1)
    rows = x.rows.index_select(0, _rows_of(x.counts, cells, sizes[me]))
    return Ragged(rows, blocks[me].contiguous()), _Record(step, blocks, blocks, sizes, sizes)


def _all_gather(x: Ragged, step, mesh: Mesh, undo: Optional[_Record]) -> tuple[Ragged, _Record]:
    n = mesh.size(step.axis)
    if undo is None:  # the counts first
        blocks = C._gather(x.counts.unsqueeze(0), 0, step.axis, mesh)  # [peers, *counts]
        receive = _sizes(blocks)
    else:  # after a split: every peer's block is known
        blocks, receive = undo.sent, undo.send
    send = (x.rows.shape[0],) * n
    sent = x.rows.expand(n, *x.rows.shape).reshape(-1, *x.rows.shape[1:])  # every row to every peer
    out, work = _exchange(sent, send, receive, step.axis, mesh)
    counts, order = _in_order(blocks, step.dim, sum(receive))  # while the rows travel
    work.wait()
    return Ragged(out.index_select(0, order), counts), _Record(step, blocks, blocks, send, receive)


def _all_to_all(x: Ragged, step, mesh: Mesh, undo: Optional[_Record]) -> tuple[Ragged, _Record]:
    """``step.dim`` becomes whole, ``step.to_dim`` split: peer ``j`` gets the cells of block ``j``."""
    n, to_dim = mesh.size(step.axis), step.to_dim
    outgoing = torch.stack(x.counts.chunk(n, to_dim))  # [peers, *block]
    if undo is None:  # the counts first, travelling while the rows are put in peer order
        blocks = torch.empty_like(outgoing)
        counts_work = dist.all_to_all_single(blocks, outgoing, group=mesh.group(step.axis), async_op=True)
    cells = torch.cat([c.reshape(-1) for c in _numbers(x.counts.shape, x.counts.device).chunk(n, to_dim)])
    sent = x.rows.index_select(0, _rows_of(x.counts, cells, x.rows.shape[0]))  # peer after peer
    if undo is None:
        counts_work.wait()
        sizes = torch.stack([outgoing.reshape(n, -1).sum(1), blocks.reshape(n, -1).sum(1)]).tolist()
        send, receive = tuple(sizes[0]), tuple(sizes[1])
    else:  # the inverse of an earlier all-to-all: what it sent comes back
        blocks, send, receive = undo.sent, undo.receive, undo.send
    out, work = _exchange(sent, send, receive, step.axis, mesh)
    counts, order = _in_order(blocks, step.dim, sum(receive))  # while the rows travel
    work.wait()
    return Ragged(out.index_select(0, order), counts), _Record(step, outgoing, blocks, send, receive)


def _run_one(x: Ragged, step, mesh: Mesh, undo: Optional[_Record]) -> tuple[Ragged, Optional[_Record]]:
    if step.kind == "all_reduce":  # the same cells on every rank: the counts stay, and so does the route
        return Ragged(C._all_reduce(x.rows, step.axis, mesh), x.counts), None
    if step.kind == "reduce_scatter":
        x = Ragged(C._all_reduce(x.rows, step.axis, mesh), x.counts)
        return _split(x, step, mesh, undo)
    if step.kind == "split":
        return _split(x, step, mesh, undo)
    if step.kind == "all_gather":
        return _all_gather(x, step, mesh, undo)
    return _all_to_all(x, step, mesh, undo)


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


def _run(x: Ragged, steps: tuple, mesh: Mesh, trace: Optional[list], what: str) -> tuple[Ragged, list[_Record]]:
    """``x`` after ``steps`` (its route updated: the inverse of the last step noted is taken from the
    note, and popped; any other exchange is pushed), and the record of every step run."""
    from fastllm.sharding.placement import Collective

    route, done = tuple(x.route), []
    for step in steps:
        n = mesh.size(step.axis)
        _check(x, step, n, what or "relayout")
        undo = route[-1] if route and _undoes(step, route[-1].step) else None
        if trace is not None and step.kind != "split":
            exchanged = step.kind in ("all_to_all", "all_gather") and undo is None
            trace.append(Collective(step.kind, step.axis, x.rows.numel() * x.rows.element_size(),
                                    f"{what} (ragged: {'counts, then rows' if exchanged else 'rows'})"))
        if mesh.is_abstract:  # shapes only; the route as it would be
            x, record = _planned(x, step, n), (None if step.kind == "all_reduce" else _Record(step, None, None, (), ()))
        else:
            x, record = _run_one(x, step, mesh, undo)
        if record is not None:
            done.append(record)
            route = route[:-1] if undo is not None else (*route, record)
    return Ragged(x.rows, x.counts, route), done


def run(x: Ragged, steps: tuple, mesh: Mesh, trace: Optional[list] = None, what: str = "") -> Ragged:
    """Apply the lowering ``steps`` to ``x`` (no autograd); on an abstract mesh only the shapes."""
    return _run(x, steps, mesh, trace, what)[0]


class _Relayout(torch.autograd.Function):
    """The rows' gradient comes back placed as the result, with its counts, and goes back by the
    backward steps (derived, as for dense tensors, by :func:`transitions`): each undoes a forward
    step, whose record it takes instead of exchanging counts."""

    @staticmethod
    def forward(rows, counts, route, mesh, forward_steps, backward_steps, trace, what, box):
        out, done = _run(Ragged(rows, counts, route), forward_steps, mesh, trace, what)
        box.extend((out.route, tuple(done)))
        # autograd saves no input returned as it is (an all-reduce keeps the counts): a view of it
        return out.rows, out.counts.view_as(out.counts) if out.counts is counts else out.counts

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mesh, ctx.backward_steps, ctx.what, box = inputs[3], inputs[5], inputs[7], inputs[8]
        ctx.done = box[1]
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad, _):
        (counts,) = ctx.saved_tensors
        back = run(Ragged(grad.contiguous(), counts, ctx.done), ctx.backward_steps, ctx.mesh, None,
                   f"{ctx.what}, backward")
        return (back.rows,) + (None,) * 8


def relayout(x: Ragged, forward: tuple, backward: tuple, mesh: Mesh, trace: Optional[list], what: str) -> Ragged:
    """:func:`fastllm.sharding.placement.relayout` of a ragged tensor (its steps already lowered)."""
    if trace is not None and mesh.is_abstract:  # planning: the forward's collectives, then the backward's
        out, done = _run(x, forward, mesh, trace, what)
        run(Ragged(out.rows, out.counts, tuple(done)), backward, mesh, trace, f"{what}, backward")
        return out
    if not x.rows.requires_grad:
        return run(x, forward, mesh, trace, what)
    box: list = []
    rows, counts = _Relayout.apply(x.rows, x.counts, x.route, mesh, forward, backward, trace, what, box)
    return Ragged(rows, counts, box[0])
