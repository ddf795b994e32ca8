"""ZeRO-3 (Rajbhandari et al. 2020): each part's parameters gathered just before it runs, the next
part's gather in flight meanwhile (FSDP's schedule, Zhao et al. 2023), gradients reduce-scattered
by the gathers' backward.

The parts are the model's own declaration (:class:`fastllm.nn.Part`, in the partitioner's
:class:`~fastllm.sharding.partitioner.Plan`): nothing here reads parameter paths. A rank's storage
block of a parameter is a run of whole rows of its compute shard (the storage rules split dim 0
first), so a gather writes every rank's rows straight into the compute tensor and the backward
reduce-scatters the gradient where autograd left it; a parameter split along another dim goes
through a ``[ranks, block]`` buffer and one copy.

When part ``k`` runs, part ``k + 1``'s gather starts (asynchronously), so it travels while ``k``
computes; a part too small to hide anything behind (a final norm) brings the one after it along.
Under recomputation the backward re-runs the repeated parts (those along ``layers``) last to first
and re-gathers them the same way. At most one gather is in flight besides the part in use.

Bound to a step (:meth:`PartGather.bind`), a gather's backward hands its reduce-scatter to the
step's :class:`~fastllm.sharding.overlap.GradientSink`, which waits for it one part later, so it
overlaps the next part's backward; unbound (evaluation) gathers run when asked and their backward
waits. Which wire the bytes take is the transport's business (:class:`Transport`): NCCL
collectives, or NVLink copy engines (:mod:`fastllm.sharding.p2p`).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Protocol

import torch
from torch import Tensor

from fastllm import tree
from fastllm.kernels.cast import cast
from fastllm.sharding.mesh import Mesh
from fastllm.sharding.overlap import GradientSink, Pending, from_rows, gather_each_async, reduce_scatter_each_async, to_rows
from fastllm.sharding.p2p import CopyEngineTransport, copy_engine_unavailable

__all__ = ["PartGather", "Transport", "NcclTransport", "SMALL_PART"]

SMALL_PART = 1 / 64  # of the largest part's bytes: a part this small brings the next one along


class Transport(Protocol):
    """Moves one part's blocks: ``gather`` -> every rank's rows of each leaf (``[ranks, numel]``),
    ``reduce_scatter`` -> this rank's summed block of each gradient (flat, in ``dtype``)."""

    def gather(self, paths: list[str], blocks: list[Tensor]) -> Pending: ...

    def reduce_scatter(self, paths: list[str], grads: list[Tensor], dims: list[int], dtype: torch.dtype) -> Pending: ...


class NcclTransport:
    """One collective per leaf, a part's launched together (one NCCL group)."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh

    def gather(self, paths: list[str], blocks: list[Tensor]) -> Pending:
        return gather_each_async([b.detach().reshape(-1) for b in blocks], "data", self.mesh)

    def reduce_scatter(self, paths: list[str], grads: list[Tensor], dims: list[int], dtype: torch.dtype) -> Pending:
        n = self.mesh.size("data")
        return reduce_scatter_each_async([to_rows(cast(g, dtype), d, n) for g, d in zip(grads, dims)], "data", self.mesh)


class _Split:
    """The ``data``-split leaves of one part: paths, storage blocks' shapes and dtypes, split dims."""

    def __init__(self, paths: list[str], blocks: list[Tensor], dims: list[int]):
        self.paths, self.dims = paths, dims
        self.shapes = [b.shape for b in blocks]
        self.dtypes = [b.dtype for b in blocks]

    def compute(self, gathered: list[Tensor]) -> list[Tensor]:
        """The compute tensors: views of the gathered rows when split along dim 0, else one copy."""
        return [from_rows(rows, d, s).to(t) for rows, d, s, t in zip(gathered, self.dims, self.shapes, self.dtypes)]

    def blocks(self, mine: list[Tensor]) -> dict[str, Tensor]:
        return {path: part.view(shape) for path, part, shape in zip(self.paths, mine, self.shapes)}


class _GatherPart(torch.autograd.Function):
    """Storage blocks of one part -> its compute tensors (waiting for a prefetched gather if one is
    in flight). Backward: the reduce-scatter of the gradients, to the sink or waited for here."""

    @staticmethod
    def forward(ctx, split: _Split, pending: Optional[Pending], transport, owner: "PartGather", *blocks):
        if pending is None:
            pending = transport.gather(split.paths, list(blocks))
        ctx.split, ctx.transport, ctx.sink, ctx.dtype = split, transport, owner.sink, owner.reduce_dtype
        return tuple(split.compute(pending.wait()))

    @staticmethod
    def backward(ctx, *grads):
        split = ctx.split
        pending = ctx.transport.reduce_scatter(split.paths, list(grads), split.dims, ctx.dtype)
        if ctx.sink is not None:
            ctx.sink.put(split.blocks, pending)
            return (None,) * (4 + len(grads))
        summed = split.blocks(pending.wait()).values()
        return (None,) * 4 + tuple(g.to(t) for g, t in zip(summed, split.dtypes))


class PartGather:
    """The ZeRO-3 gathers of one model under one plan (see the module docstring).

    ``parts``: per part, the dotted paths of the leaves it uses and whether it is a repeated unit
    (along ``layers``); ``data_dims``: each leaf's storage split dim (``None``: stored whole).
    ``prefetch=False`` gathers each part synchronously when it runs (debugging; same values).
    ``transport``: ``"nccl"``, ``"copy_engine"`` or ``"auto"`` (the copy engines where they can run).
    """

    def __init__(self, mesh: Mesh, parts: list[tuple[list[str], bool]], data_dims: dict[str, Optional[int]],
                 reduce_dtype: torch.dtype = torch.float32, *, transport: str = "auto", prefetch: bool = True):
        self.mesh, self.parts, self.data_dims = mesh, parts, data_dims
        self.reduce_dtype, self.transport_name, self.prefetch = reduce_dtype, transport, prefetch
        self.nccl = NcclTransport(mesh)
        self.owner = {}  # leaf -> the first part that uses it (where the copy-engine shadow files it)
        for index, (leaves, _) in enumerate(parts):
            for path in leaves:
                self.owner.setdefault(path, index)
        self._copy_engine: Optional[CopyEngineTransport] = None
        self._unavailable: Optional[str] = None
        self._params: Any = None
        self._pending: dict[int, Pending] = {}
        self._seen: set[int] = set()
        self._small: set[int] = set()
        self._largest = 0
        self._backward = False
        self.sink: Optional[GradientSink] = None
        self.reset_counts()

    def reset_counts(self) -> None:
        """What overlapped since the last reset: gathers; how many were prefetched; the most gathers
        in flight at once (tiny parts not counted: the memory bound); how many parts a tiny part
        brought along; how many gathers took the copy engines."""
        self.counts = {"gathers": 0, "prefetched": 0, "most_in_flight": 0, "companions": 0, "copy_engine_gathers": 0}

    # --- the compute params of a micro-batch ---
    def compute_params(self, masters: Any, dtype: torch.dtype, *, refill: bool = True) -> Any:
        """``masters`` (this rank's storage blocks) in the compute ``dtype``: the tree a micro-batch
        runs on. Under the copy-engine transport the split leaves are the shadow's blocks that peers
        gather from, cast into it when ``refill`` (not for a later micro-batch of the same step)."""
        flat = tree.flatten(masters)
        blocks = {path: (t.shape, str(self.owner[path])) for path, t in flat.items()
                  if self.data_dims.get(path) == 0 and t.is_floating_point()}
        engine = self._engine(blocks, dtype) if blocks else None
        views = {} if engine is None else engine.fill({path: flat[path] for path in blocks}, write=refill)

        def compute(path: str, t: Any) -> Any:
            if path in views:
                return views[path]
            return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t

        return tree.map_with_path(compute, masters)

    def _engine(self, blocks: dict, dtype: torch.dtype) -> Optional[CopyEngineTransport]:
        """The copy-engine transport for these blocks (built on first use, a collective), or ``None``."""
        if self.transport_name == "nccl":
            return None
        if self._copy_engine is None and self._unavailable is None:
            self._unavailable = copy_engine_unavailable(self.mesh)
        if self._unavailable is not None:
            if self.transport_name == "copy_engine":
                raise RuntimeError(f"transport='copy_engine' cannot run here: {self._unavailable}")
            return None
        if self._copy_engine is None or not self._copy_engine.matches(blocks, dtype):
            self._copy_engine = None  # its buffers go back before the new ones are taken
            try:
                self._copy_engine = CopyEngineTransport(self.mesh, blocks, dtype)
            except RuntimeError as error:  # raised on every data rank alike
                if self.transport_name == "copy_engine":
                    raise
                self._unavailable = str(error)
                warnings.warn(f"ZeRO-3 falls back to NCCL collectives: {error}", RuntimeWarning, stacklevel=2)
        return self._copy_engine

    def _transport(self, index: int, split: _Split, blocks: list[Tensor]):
        """The copy engines when every split leaf of the part lies in the shadow, filed under this
        part (the same answer on every rank: it depends on the model and the config only)."""
        engine = self._copy_engine
        if (engine is not None and all(self.owner[p] == index for p in split.paths)
                and engine.holds(split.paths, tuple(blocks))):
            return _CopyEngine(engine, split)
        return self.nccl

    # --- one micro-batch ---
    def bind(self, params: dict[str, Tensor], sink: Optional[GradientSink]) -> None:
        """The forward of a micro-batch on ``params`` (flat: dotted path -> compute-dtype storage
        block) begins."""
        self._params, self.sink = params, sink
        sizes = [sum(t.numel() * t.element_size() for t in self._split_blocks(i)[1]) for i in range(len(self.parts))]
        self._largest = max(sizes) if sizes else 0
        self._small = {i for i, size in enumerate(sizes) if 0 < size < SMALL_PART * self._largest}
        self._pending, self._seen, self._backward = {}, set(), False

    def reverse(self, remat: bool) -> None:
        """Backward begins: under ``remat`` the repeated parts are re-gathered last to first."""
        self._backward, self._seen = True, set()
        order = self._order()
        if remat and order:
            self._start(order[0])

    def release(self) -> None:
        """Wait for gathers nobody used (every rank started them, so every rank waits) and unbind."""
        for pending in self._pending.values():
            pending.wait()
        self._params, self._pending, self.sink = None, {}, None

    # --- the gather of one part ---
    def gathered(self, index: int, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """The compute tensors of part ``index``'s split leaves (``path -> tensor``; ``params`` flat,
        as for :meth:`bind`), starting the next part's gather when prefetching."""
        split, blocks = self._split_blocks(index, params)
        if not split.paths:
            self._after(index)
            return {}
        pending = self._pending.pop(index, None)
        self.counts["gathers"] += 1
        self.counts["prefetched"] += pending is not None
        transport = self._transport(index, split, blocks)
        if pending is None and self._params is not None:
            pending = self._launch(index, split, blocks, transport)  # before the next: one order on every rank
        self._after(index)
        return dict(zip(split.paths, _GatherPart.apply(split, pending, transport, self, *blocks)))

    def _split_blocks(self, index: int, params: Optional[dict[str, Tensor]] = None) -> tuple[_Split, list[Tensor]]:
        params = self._params if params is None else params
        # (a leaf another pipeline stage holds is not here: this rank never runs that part)
        paths = [p for p in self.parts[index][0] if self.data_dims.get(p) is not None and p in params]
        blocks = [params[p] for p in paths]
        return _Split(paths, blocks, [self.data_dims[p] for p in paths]), blocks

    def _launch(self, index: int, split: _Split, blocks: list[Tensor], transport) -> Pending:
        if isinstance(transport, _CopyEngine):
            self.counts["copy_engine_gathers"] += 1
        return transport.gather(split.paths, blocks)

    # --- prefetch order ---
    def _order(self) -> list[int]:
        if self._backward:
            return [i for i in reversed(range(len(self.parts))) if self.parts[i][1]]
        return list(range(len(self.parts)))

    def _next(self, index: int) -> Optional[int]:
        order = self._order()
        if index not in order:
            return None
        at = order.index(index) + 1
        return order[at] if at < len(order) else None

    def _after(self, index: int) -> None:
        self._seen.add(index)
        if self._params is not None and self.prefetch:
            following = self._next(index)
            if following is not None:
                self._start(following)

    def _start(self, index: int) -> None:
        if index in self._seen or index in self._pending:
            return
        split, blocks = self._split_blocks(index)
        if not split.paths:
            return
        self._pending[index] = self._launch(index, split, blocks, self._transport(index, split, blocks))
        large = [i for i in self._pending if i not in self._small]
        self.counts["most_in_flight"] = max(self.counts["most_in_flight"], len(large))
        if index in self._small:
            # A tiny part (the final norm) hides no gather behind its compute: bring the part after
            # it along, or that part's gather would wait in the open (~3 ms for Llama-8B's LM head).
            following = self._next(index)
            if following is not None and following not in self._pending and following not in self._seen:
                self.counts["companions"] += 1
                self._start(following)


class _CopyEngine:
    """The copy-engine transport for one part (see :mod:`fastllm.sharding.p2p`)."""

    def __init__(self, engine: CopyEngineTransport, split: _Split):
        self.engine, self.split = engine, split

    def gather(self, paths: list[str], blocks: list[Tensor]) -> Pending:
        return self.engine.gather(paths, self.split.shapes)

    def reduce_scatter(self, paths: list[str], grads: list[Tensor], dims: list[int], dtype: torch.dtype) -> Pending:
        return self.engine.reduce_scatter(paths, tuple(grads), dtype)

