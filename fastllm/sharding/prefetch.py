"""ZeRO-3 parameter gathers prefetched one block ahead (FSDP's schedule, Zhao et al. 2023).

Each part of the model (``embed``, ``layers.i``, ``final_norm``, ``lm_head``) is all-gathered over
``data``, one collective per parameter. The default storage rules split each parameter over
``data`` along dim 0 of its compute shard, so a rank's block is a run of whole rows: the gather
writes the rows of all ranks, in rank order, straight into the compute shard, and the backward's
reduce-scatter reads the gradient where autograd left it (cast to the reduce dtype if need be).
Neither direction packs or unpacks (FSDP's flat buffers cost a copy each way, ~10% of a Llama-8B
step on 4 H200s when we had them). A parameter split along another dim goes through a
``[ranks, block]`` buffer and one copy. When part ``k`` is used, the gather of the next
part is started (``async_op=True``), so it travels while part ``k`` computes; under ``remat`` the
backward recomputes the blocks last to first and re-gathers them the same way, one block ahead. At
most one gather is in flight besides the part in use: about two blocks of gathered parameters are
alive under ``remat`` (without it autograd keeps every block's gathered parameters until backward
anyway). The gather's backward packs the part's gradients into a ``[data, n]`` buffer and starts
their reduce-scatter; bound to a step, it hands the result to a
:class:`~fastllm.sharding.overlap.GradientSink` (waited for when the next part's reduce-scatter
starts, so it overlaps that part's backward) instead of returning it through autograd. Unbound
(evaluation, a caller's own backward) the same hook gathers when asked and its backward waits: a
plain autograd function.

Which wire a part's bytes travel is the transport's business (``transport=``): NCCL collectives as
above, or NVLink copy engines from a shadow of compute-dtype blocks (:mod:`fastllm.sharding.p2p`),
for which :meth:`PrefetchGather.compute_params` hands the micro-batch the shadow's blocks.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from fastllm import tree
from fastllm.kernels.cast import cast
from fastllm.sharding.embedding import sharded_lookup
from fastllm.sharding.mesh import Mesh
from fastllm.sharding.overlap import (
    GradientSink, Pending, from_rows, gather_each_async, part_of, part_order, reduce_scatter_each_async, to_rows,
)
from fastllm.sharding.p2p import CopyEngineTransport, copy_engine_unavailable

__all__ = ["PrefetchGather"]

SMALL_PART = 1 / 64  # of the largest part's bytes: a part this small brings the next one along


class _PartLayout:
    """Where each ``data``-split leaf of one part lies in the flat buffer of its storage blocks."""

    def __init__(self, path: str, subs: list[str], blocks: list[Tensor], dims: list[int], n: int):
        self.path, self.subs, self.dims, self.n = path, subs, dims, n
        self.paths = [f"{path}.{sub}" for sub in subs]
        self.shapes = [b.shape for b in blocks]
        self.dtypes = [b.dtype for b in blocks]

    def gather(self, blocks: tuple[Tensor, ...], mesh: Mesh) -> Pending:
        """Start one all-gather per block; each result is ``[ranks, block numel]``."""
        return gather_each_async([b.detach().reshape(-1) for b in blocks], "data", mesh)

    def unpack_gathered(self, gathered: list[Tensor]) -> list[Tensor]:
        """The compute shards: views of the gathered rows when split along dim 0, else one copy."""
        return [from_rows(rows, d, s).to(t) for rows, d, s, t in zip(gathered, self.dims, self.shapes, self.dtypes)]

    def scatter_grads(self, grads: tuple[Tensor, ...], dtype: torch.dtype, mesh: Mesh) -> Pending:
        """Start one reduce-scatter per gradient (``to_rows`` is a view for dim 0 splits)."""
        return reduce_scatter_each_async([to_rows(cast(g, dtype), d, self.n) for g, d in zip(grads, self.dims)],
                                         "data", mesh)

    def unpack_blocks(self, mine: list[Tensor]) -> dict[str, Tensor]:
        return {f"{self.path}.{sub}": part.view(shape) for sub, part, shape in zip(self.subs, mine, self.shapes)}


class _GatherPart(torch.autograd.Function):
    """Storage blocks of one part -> its compute shards (waiting for a prefetched gather if given).
    Backward: reduce-scatter of the gradients, handed to ``sink`` (no autograd result) or waited for."""

    @staticmethod
    def forward(ctx, layout: _PartLayout, pending: Optional[Pending], sink, gather: "PrefetchGather", *blocks):
        if pending is None:
            pending = gather.launch(layout, blocks)
        ctx.layout, ctx.sink, ctx.gather = layout, sink, gather
        ctx.copy_engine = gather.copy_engine_for(layout, blocks)
        return tuple(layout.unpack_gathered(pending.wait()))

    @staticmethod
    def backward(ctx, *grads):
        layout, gather = ctx.layout, ctx.gather
        if ctx.copy_engine is not None:
            pending = ctx.copy_engine.reduce_scatter(layout.paths, grads, gather.reduce_dtype)
        else:
            pending = layout.scatter_grads(grads, gather.reduce_dtype, gather.mesh)
        if ctx.sink is not None:
            ctx.sink.put(layout.unpack_blocks, pending)
            return (None,) * (4 + len(grads))
        blocks = layout.unpack_blocks(pending.wait()).values()
        return (None,) * 4 + tuple(g.to(t) for g, t in zip(blocks, layout.dtypes))


class PrefetchGather:
    """The ZeRO-3 ``params`` hook of :class:`~fastllm.sharding.tensor_parallel.ParallelLayout`, with
    prefetch while bound (:meth:`bind` ... :meth:`reverse` ... :meth:`release`, one micro-batch)."""

    def __init__(self, mesh: Mesh, data_dims: dict[str, int | None], reduce_dtype: torch.dtype = torch.float32,
                 transport: str = "auto"):  # one of p2p.TRANSPORTS, checked by the Partitioner
        self.mesh, self.data_dims, self.reduce_dtype, self.transport = mesh, data_dims, reduce_dtype, transport
        self._copy_engine: Optional[CopyEngineTransport] = None
        self._unavailable: Optional[str] = None  # why the copy engines cannot serve this mesh, once asked
        self._parts: Optional[dict[str, Any]] = None
        self._order: list[str] = []
        self._pending: dict[str, Pending] = {}
        self._seen: set[str] = set()
        self._small: set[str] = set()  # parts prefetched together with the one after them
        self._largest = 0
        self._sparse_embed = False
        self._backward = False
        self.sink: Optional[GradientSink] = None
        self.reset_counts()

    def reset_counts(self) -> None:
        """What overlapped since the last reset: gathers; how many were prefetched; the most
        prefetches in flight at once, tiny parts not counted (the memory bound); how many parts a
        tiny part brought along; token lookups from the table's storage block."""
        self.counts = {"gathers": 0, "prefetched": 0, "most_in_flight": 0, "companions": 0, "lookups": 0,
                       "copy_engine_gathers": 0}

    # --- the compute params of a micro-batch ---
    def compute_params(self, masters: Any, dtype: torch.dtype, *, refill: bool = True, sources: Any = None) -> Any:
        """``masters`` (this rank's storage blocks, any float dtype) cast to the compute ``dtype``:
        the tree a micro-batch runs on. Under the copy-engine transport the split leaves are views of
        the shadow that peers gather from (:mod:`fastllm.sharding.p2p`), cast there unless
        ``refill=False`` (a later micro-batch of the same step: the masters have not changed) or the
        optimizer already wrote them from ``sources`` (the tree the masters were detached from)."""
        flat = tree.flatten(masters)
        blocks = {path: (t.shape, part_of(path)) for path, t in flat.items()
                  if self.data_dims.get(path) == 0 and t.is_floating_point()}
        engine = self._engine(blocks, dtype) if blocks else None
        views = {}
        if engine is not None:
            origin = None if sources is None else tree.flatten(sources)
            views = engine.fill({path: flat[path] for path in blocks}, write=refill,
                                sources=None if origin is None else {path: origin[path] for path in blocks})

        def compute(path: str, t: Any) -> Any:
            if path in views:
                return views[path]
            return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t

        return tree.map_with_path(compute, masters)

    def rounded_copies(self, params: Any) -> Any:
        """The shadow views of ``params`` (the optimizer's masters) for the optimizer to write their
        rounded new values into, after a barrier (no rank still reads the shadow); ``None`` when
        the shadow does not hold every leaf of ``params``."""
        engine = self._copy_engine
        flat = tree.flatten(params)
        if engine is None or flat.keys() != engine.blocks.keys() or any(
                flat[path].shape != engine.blocks[path][0] for path in flat):
            return None
        engine.barrier()  # nobody still reads the values the optimizer is about to overwrite
        return tree.map_with_path(lambda path, _: engine.shadow.block(path), params)

    def rounded_written(self, params: Any) -> None:
        """The optimizer wrote :meth:`rounded_copies` from these params (updated in place)."""
        if self._copy_engine is not None:
            self._copy_engine.shadow.written_from(tree.flatten(params))

    def _engine(self, blocks: dict, dtype: torch.dtype) -> Optional[CopyEngineTransport]:
        """The copy-engine transport for these blocks (built on first use, a collective), or ``None``."""
        if self.transport == "nccl":
            return None
        if self._copy_engine is None and self._unavailable is None:
            self._unavailable = copy_engine_unavailable(self.mesh)
        if self._unavailable is not None:
            if self.transport == "copy_engine":
                raise RuntimeError(f"transport='copy_engine' cannot run here: {self._unavailable}")
            return None
        if self._copy_engine is None or not self._copy_engine.matches(blocks, dtype):
            self._copy_engine = None  # its buffers go back before the new ones are taken
            try:
                self._copy_engine = CopyEngineTransport(self.mesh, blocks, dtype)
            except RuntimeError as error:  # raised on every data rank alike
                if self.transport == "copy_engine":
                    raise
                self._unavailable = str(error)
                warnings.warn(f"ZeRO-3 falls back to NCCL collectives: {error}", RuntimeWarning, stacklevel=2)
        return self._copy_engine

    def copy_engine_for(self, layout: _PartLayout, blocks: tuple[Tensor, ...]) -> Optional[CopyEngineTransport]:
        """The transport that moves this part when every split leaf of it is in the shadow
        (the same answer on every rank: it depends on the model and the config only)."""
        engine = self._copy_engine
        if engine is not None and self._parts is not None and engine.holds(layout.paths, blocks):
            return engine
        return None

    # --- one micro-batch ---
    def bind(self, params: Any, sink: Optional[GradientSink]) -> None:
        """The forward of a micro-batch on ``params`` (the tree the model is called with) begins."""
        self._order = part_order(params)
        self._parts = {path: _part(params, path) for path in self._order}
        self._largest = max(_nbytes(tree.leaves(part)) for part in self._parts.values())
        self._small = set()
        # The table is looked up from its storage block when its rows are split over data and it is
        # not also the LM head (tied: the head needs the whole block of every rank anyway).
        self._sparse_embed = ("lm_head" in self._order and self.data_dims.get("embed.tokens") == 0
                              and self.mesh.size("tensor") == 1)
        self._pending, self._seen, self._backward, self.sink = {}, set(), False, sink

    def reverse(self, remat: bool) -> None:
        """Backward begins: under ``remat`` the blocks are re-gathered last to first; start the last."""
        self._backward, self._seen = True, set()
        blocks = self._blocks()
        if remat and blocks:
            self._prefetch(blocks[-1])

    def release(self) -> None:
        """Wait for gathers nobody used (every rank started them, so every rank waits) and unbind."""
        for pending in self._pending.values():
            pending.wait()
        self._parts, self._order, self._pending, self.sink = None, [], {}, None
        self._sparse_embed = False

    # --- the hook ---
    def __call__(self, path: str, part: Any) -> Any:
        split = self._split(path, part)
        if split is None:
            if self._parts is not None and path not in self._seen:  # nothing to gather
                self._seen.add(path)
                if not (path == "embed" and self._sparse_embed):  # else lookup() prefetches, after its own
                    self._prefetch_after(path)
            return part
        layout, blocks = split
        pending = self._pending.pop(path, None)
        self.counts["gathers"] += 1
        self.counts["prefetched"] += pending is not None
        if pending is None and self._parts is not None:
            pending = self.launch(layout, blocks)  # before the next part's: the same order on every rank
        self._seen.add(path)
        if self._parts is not None:
            self._prefetch_after(path)
        gathered = dict(zip(layout.subs, _GatherPart.apply(layout, pending, self.sink, self, *blocks)))
        return tree.map_with_path(lambda sub, x: gathered.get(sub, x), part)

    def launch(self, layout: _PartLayout, blocks) -> Pending:
        engine = self.copy_engine_for(layout, blocks)
        if engine is not None:
            self.counts["copy_engine_gathers"] += 1
            return engine.gather(layout.paths, layout.shapes)
        return layout.gather(blocks, self.mesh)

    def lookup(self, table: Tensor, ids: Tensor) -> Optional[Tensor]:
        """The token embeddings from the table's storage block (:mod:`fastllm.sharding.embedding`) when
        this micro-batch looks up without gathering the table, else ``None`` (the caller gathered it)."""
        if not self._sparse_embed:
            return None
        self.counts["lookups"] += 1
        out = sharded_lookup(table, ids, self.mesh, sink=self.sink, reduce_dtype=self.reduce_dtype)
        self._prefetch_after("embed")  # its collectives are queued first: the lookup waits on no gather
        return out

    def _prefetch_after(self, path: str) -> None:
        following = self._next(path)
        if following is not None:
            self._prefetch(following)

    def _split(self, path: str, part: Any) -> Optional[tuple[_PartLayout, tuple[Tensor, ...]]]:
        split = [(sub, x, self.data_dims[f"{path}.{sub}"]) for sub, x in tree.leaves_with_path(part)]
        if path == "embed" and self._sparse_embed:  # looked up from the storage block, not gathered
            split = [(sub, x, dim) for sub, x, dim in split if sub != "tokens"]
        split = [(sub, x, dim) for sub, x, dim in split if dim is not None]
        if not split:
            return None
        subs, blocks, dims = zip(*split)
        return _PartLayout(path, list(subs), list(blocks), list(dims), self.mesh.size("data")), blocks

    # --- prefetch order ---
    def _blocks(self) -> list[str]:
        return [path for path in self._order if path.rsplit(".", 1)[-1].isdigit()]

    def _next(self, path: str) -> Optional[str]:
        order = self._order if not self._backward else self._blocks()[::-1]
        if path not in order:
            return None
        index = order.index(path) + 1
        return order[index] if index < len(order) else None

    def _prefetch(self, path: str) -> None:
        if path in self._seen or path in self._pending:
            return
        split = self._split(path, self._parts[path])
        if split is None:
            return
        self._pending[path] = self.launch(*split)
        large = [p for p in self._pending if p not in self._small]
        self.counts["most_in_flight"] = max(self.counts["most_in_flight"], len(large))
        if _nbytes(split[1]) < SMALL_PART * self._largest:
            # A tiny part (the final norm) hides no gather behind its compute: bring the part
            # after it along, or the LM head's gather would wait in the open (~3 ms on Llama-8B).
            self._small.add(path)
            following = self._next(path)
            if following is not None and following not in self._pending and following not in self._seen:
                self.counts["companions"] += 1
                self._prefetch(following)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _part(params: Any, path: str) -> Any:
    name, _, index = path.partition(".")
    return params[name][int(index)] if index else params[name]
