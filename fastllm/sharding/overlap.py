"""Gradient reduction overlapped with backward (PyTorch DDP's buckets, Li et al. 2020), and the
asynchronous flat collectives it and the ZeRO-3 gathers (:mod:`fastllm.sharding.zero3`) use.
Results equal the synchronous path of :mod:`fastllm.sharding.zero`: the same sums of the same
values, only started earlier.

Which leaves need which sums comes from the plan: a leaf's gradient is a partial sum over the mesh
axes that split the operations it is used in and not the leaf itself (``data`` for every
parameter; also ``tensor`` for the ones replicated over ``tensor`` under sequence parallelism).
The leaves summed over ``data`` only are grouped, in reverse order of use (the model's parts
backwards: head, last block, ..., first block, embedding), into flat buffers of at most
``bucket_bytes``. A
``post_accumulate_grad`` hook copies each leaf's gradient into its bucket (in ``reduce_dtype``) as
soon as autograd has accumulated it, and frees the leaf's ``.grad``; a full bucket starts its
collective (``async_op=True``) while backward goes on: an all-reduce over ``data`` (stages 0 and 1;
leaves too small to split at 2 and 3) or a reduce-scatter of a ``[data, n]`` buffer whose row ``r``
holds data rank ``r``'s blocks (stage 2). Buckets start strictly in bucket order, so every rank
issues the same collectives in the same order whatever order hooks fire in; at most
``MAX_IN_FLIGHT`` are in flight (an older one is waited for and unpacked into its small result),
which bounds the buffers alive at once. Stage 3's split leaves are reduce-scattered by the backward
of their prefetched gather instead and arrive through a :class:`GradientSink`.

Gradient accumulation: only the last micro-batch's backward reduces; earlier micro-batches
accumulate locally into ``.grad`` (DDP's ``no_sync``), so the reduced value is the same sum of the
same local gradients as the synchronous path's. Gradients that need two reductions (over ``tensor``
and ``data``: norms and output biases under sequence parallelism, all small) are reduced after
backward, as is everything with ``overlap=False``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fastllm.sharding.mesh import Mesh
from fastllm.sharding.zero import reduce_gradients

__all__ = [
    "Pending", "gather_async", "reduce_scatter_async", "gather_each_async", "reduce_scatter_each_async",
    "all_reduce_async", "to_rows", "from_rows", "GradientSink", "GradientReduction", "MAX_IN_FLIGHT",
]

MAX_IN_FLIGHT = 2  # reduction collectives launched and not yet waited for

# torch >= 2.13 renamed the single-buffer collectives; older versions only have the first names.
_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_SCATTER_SINGLE = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --- asynchronous flat collectives ---------------------------------------------------------------
class Pending:
    """A collective in flight; :meth:`wait` returns its result."""

    def __init__(self, work, finish: Callable[[], Any]):
        self._work, self._finish = work, finish

    def wait(self) -> Any:  # a Tensor, or a list of them (several collectives as one)
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._finish()


def _refused(error: Exception, group) -> bool:
    """True when a backend (old gloo, never NCCL) does not implement a single-buffer collective."""
    text = str(error).lower()
    return dist.get_backend(group) != "nccl" and (
        isinstance(error, NotImplementedError) or "support" in text or "implement" in text)


def gather_async(flat: Tensor, axis: str, mesh: Mesh) -> Pending:
    """Start the all-gather of a 1-D ``flat`` over ``axis``; the result is ``[ranks, flat.numel()]``."""
    n, group = mesh.size(axis), mesh.group(axis)
    out = flat.new_empty((n, flat.numel()))
    try:
        return Pending(_GATHER_SINGLE(out.view(-1), flat, group=group, async_op=True), lambda: out)
    except (RuntimeError, NotImplementedError) as error:
        if not _refused(error, group):
            raise
    parts = list(out.unbind(0))
    return Pending(dist.all_gather(parts, flat, group=group, async_op=True), lambda: out)


def reduce_scatter_async(rows: Tensor, axis: str, mesh: Mesh) -> Pending:
    """Start summing ``rows`` ``[ranks, m]`` over ``axis``; the result is this rank's row ``[m]``."""
    group = mesh.group(axis)
    out = rows.new_empty(rows.shape[1:])
    try:
        return Pending(_SCATTER_SINGLE(out, rows.view(-1), group=group, async_op=True), lambda: out)
    except (RuntimeError, NotImplementedError) as error:
        if not _refused(error, group):
            raise
    work = dist.all_reduce(rows, group=group, async_op=True)  # n times the traffic: old gloo only
    return Pending(work, lambda: rows[mesh.rank(axis)])


def _each_async(inputs: list[Tensor], axis: str, mesh: Mesh, one_by_one: Callable[..., Pending],
                single: Callable, make_out: Callable[[Tensor], Tensor]) -> Pending:
    """One collective per input, launched together: as one NCCL group (one kernel), or one by one
    (``one_by_one``, e.g. on gloo); the result is the list of their results."""
    group = mesh.group(axis)
    if dist.get_backend(group) != "nccl":
        pendings = [one_by_one(x, axis, mesh) for x in inputs]
        return Pending(None, lambda: [p.wait() for p in pendings])
    outs = [make_out(x) for x in inputs]
    with dist.distributed_c10d._coalescing_manager(group=group, async_ops=True) as manager:
        for out, x in zip(outs, inputs):
            single(out.view(-1), x.reshape(-1), group=group)
    return Pending(manager, lambda: outs)


def gather_each_async(flats: list[Tensor], axis: str, mesh: Mesh) -> Pending:
    """:func:`gather_async` of each 1-D tensor of ``flats``, launched together; the result is the list
    of ``[ranks, numel]`` tensors."""
    n = mesh.size(axis)
    return _each_async(flats, axis, mesh, gather_async, _GATHER_SINGLE, lambda flat: flat.new_empty((n, flat.numel())))


def reduce_scatter_each_async(rows: list[Tensor], axis: str, mesh: Mesh) -> Pending:
    """:func:`reduce_scatter_async` of each ``[ranks, m]`` tensor of ``rows``, launched together; the
    result is the list of this rank's rows."""
    return _each_async(rows, axis, mesh, reduce_scatter_async, _SCATTER_SINGLE, lambda r: r.new_empty(r.shape[1:]))


def all_reduce_async(flat: Tensor, axis: str, mesh: Mesh) -> Pending:
    """Start summing ``flat`` over ``axis`` in place."""
    return Pending(dist.all_reduce(flat, group=mesh.group(axis), async_op=True), lambda: flat)


def to_rows(t: Tensor, dim: int, n: int) -> Tensor:
    """``[n, numel / n]``: row ``r`` holds block ``r`` of ``t`` along ``dim``, flattened (a view when
    it can be; the callers copy it into a flat buffer anyway)."""
    return t.unflatten(dim, (n, t.shape[dim] // n)).movedim(dim, 0).reshape(n, -1)


def from_rows(rows: Tensor, dim: int, block: torch.Size) -> Tensor:
    """Inverse of :func:`to_rows`: the blocks of ``rows`` concatenated along ``dim``."""
    n = rows.shape[0]
    return rows.reshape(n, *block).movedim(0, dim).flatten(dim, dim + 1)


# --- results of reductions started inside autograd --------------------------------------------------------------------
class GradientSink:
    """Receives the reduce-scatters started by the gathers' backward and sums their results per path
    (over micro-batches, and over the two uses of tied embeddings)."""

    def __init__(self):
        self._pending: deque = deque()
        self.grads: dict[str, Tensor] = {}

    def put(self, unpack: Callable[[Tensor], dict[str, Tensor]], pending: Pending) -> None:
        self._pending.append((unpack, pending))
        # A part's reduce-scatter is waited for when the one after next starts: it has a whole
        # block's backward to finish (waiting at the next part's start stalled the GPU behind the
        # LM head's 2 GB reduce-scatter, since the final norm's backward between them is tiny).
        while len(self._pending) > MAX_IN_FLIGHT:
            self._collect_one()

    def drain(self) -> None:
        while self._pending:
            self._collect_one()

    def _collect_one(self) -> None:
        unpack, pending = self._pending.popleft()
        for path, g in unpack(pending.wait()).items():
            self.grads[path] = g if path not in self.grads else self.grads[path] + g




# --- buckets of gradients reduced during backward ---------------------------------------------------
class _Bucket:
    def __init__(self, kind: str, members: list[int]):
        self.kind, self.members = kind, members  # kind: "reduce" (all-reduce) or "scatter"
        self.missing = set(members)
        self.offsets: dict[int, int] = {}
        self.buffer: Optional[Tensor] = None
        self.pending: Optional[Pending] = None


class GradientReduction:
    """One train step's gradient reduction (see the module docstring). ``masters``: the flat
    ``{path: leaf}`` the step differentiates; ``reduce_axes``: each leaf's partial-sum axes (from
    the plan); ``use_order``: each leaf's first part (bucket order is the reverse); ``gather``: the
    ZeRO-3 :class:`~fastllm.sharding.zero3.PartGather` when parameters are gathered with prefetch.
    ``overlap=False`` reduces everything after backward (same values)."""

    def __init__(
        self,
        masters: dict[str, Tensor],
        *,
        zero_stage: int,
        data_dims: dict[str, int | None],
        reduce_axes: dict[str, frozenset],
        use_order: dict[str, int],
        mesh: Mesh,
        dtype: torch.dtype,
        limit_bytes: int,
        gather=None,
        overlap: bool = True,
    ):
        self.masters, self.mesh, self.dtype, self.gather = masters, mesh, dtype, gather
        self.zero_stage, self.data_dims, self.reduce_axes = zero_stage, data_dims, reduce_axes
        self.limit_bytes, self.overlap = limit_bytes, overlap
        self.leaves = list(masters.items())
        self.kinds = [self._kind(path) for path, _ in self.leaves]
        self.buckets = self._buckets(use_order) if overlap else []
        self.bucket_of = {i: b for b in self.buckets for i in b.members}
        self.sink = GradientSink()
        self._next, self._in_flight = 0, deque()
        self._results: dict[str, Tensor] = {}
        self.started_in_backward = 0  # buckets whose collective a hook started (tests, debugging)
        if gather is not None:
            gather.reset_counts()

    def _kind(self, path: str) -> str:
        axes, dim = self.reduce_axes[path], self.data_dims[path]
        if not axes:
            return "none"  # every rank computed the whole gradient (or there is one rank)
        if dim is not None and self.zero_stage == 3 and self.gather is not None and axes == {"data"}:
            return "sink"  # the gather's backward reduce-scatters it
        if axes != {"data"} or not self.overlap:  # (a sink gradient summed over data may still need tensor)
            return "after"  # reduced after backward (over tensor too: two collectives)
        return "scatter" if dim is not None and self.zero_stage == 2 else "reduce"

    def _buckets(self, use_order: dict[str, int]) -> list[_Bucket]:
        use = sorted(range(len(self.leaves)), key=lambda i: -use_order[self.leaves[i][0]])
        buckets, size = [], 0
        for i in use:
            kind, t = self.kinds[i], self.leaves[i][1]
            if kind not in ("reduce", "scatter"):
                continue
            nbytes = t.numel() * self.dtype.itemsize
            if not buckets or buckets[-1].kind != kind or size + nbytes > self.limit_bytes:
                buckets.append(_Bucket(kind, []))
                size = 0
            buckets[-1].members.append(i)
            buckets[-1].missing.add(i)
            size += nbytes
        for b in buckets:
            offset = 0
            for i in b.members:
                b.offsets[i] = offset
                offset += self._width(i, b.kind)
        return buckets

    def _width(self, i: int, kind: str) -> int:
        numel = self.leaves[i][1].numel()
        return numel if kind == "reduce" else numel // self.mesh.size("data")

    # --- one micro-batch ---
    @contextmanager
    def micro_batch(self, params: dict[str, Tensor], *, last: bool):
        """Forward and backward of one micro-batch on ``params`` (flat: the masters cast to the
        compute dtype); only the ``last`` one's backward reduces as it goes."""
        if self.gather is not None:
            self.gather.bind(params, self.sink)
        hooks = []
        if last:
            hooks = [self.leaves[i][1].register_post_accumulate_grad_hook(partial(self._arrived, i))
                     for i in self.bucket_of]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            if self.gather is not None:
                self.gather.release()
            self.sink.drain()

    def backward(self, loss: Tensor, *, remat: bool) -> None:
        if self.gather is not None:
            self.gather.reverse(remat)
        loss.backward()

    def _arrived(self, i: int, leaf: Tensor) -> None:
        bucket = self.bucket_of[i]
        if i in bucket.missing:
            self._put(bucket, i, leaf.grad)
            leaf.grad = None
            before = self._next
            self._launch_ready()
            self.started_in_backward += self._next - before

    def _put(self, bucket: _Bucket, i: int, g: Tensor) -> None:
        n = self.mesh.size("data")
        if bucket.buffer is None:
            width = sum(self._width(j, bucket.kind) for j in bucket.members)
            shape = (width,) if bucket.kind == "reduce" else (n, width)
            bucket.buffer = torch.empty(shape, dtype=self.dtype, device=g.device)
        start, width = bucket.offsets[i], self._width(i, bucket.kind)
        if bucket.kind == "reduce":
            bucket.buffer[start:start + width].copy_(g.reshape(-1))
        else:
            bucket.buffer[:, start:start + width].copy_(to_rows(g, self.data_dims[self.leaves[i][0]], n))
        bucket.missing.discard(i)

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and not self.buckets[self._next].missing:
            bucket = self.buckets[self._next]
            launch = all_reduce_async if bucket.kind == "reduce" else reduce_scatter_async
            bucket.pending = launch(bucket.buffer, "data", self.mesh)
            self._in_flight.append(bucket)
            self._next += 1
            while len(self._in_flight) > MAX_IN_FLIGHT:
                self._collect(self._in_flight.popleft())

    def _collect(self, bucket: _Bucket) -> None:
        result, n = bucket.pending.wait(), self.mesh.size("data")
        for i in bucket.members:
            path, leaf = self.leaves[i]
            start, width = bucket.offsets[i], self._width(i, bucket.kind)
            shape = list(leaf.shape)
            if bucket.kind == "scatter":
                shape[self.data_dims[path]] //= n
            self._results[path] = result[start:start + width].view(shape).to(leaf.dtype)
        bucket.buffer = bucket.pending = None

    @property
    def stats(self) -> dict[str, int]:
        """How much overlapped: buckets, those started during backward, ZeRO-3 gathers and how many
        of them were prefetched, and the most prefetches in flight at once, over this step."""
        gather = {} if self.gather is None else dict(self.gather.counts)
        return {"buckets": len(self.buckets), "started_in_backward": self.started_in_backward, **gather}

    # --- after the last micro-batch ---
    def finish(self) -> dict[str, Tensor]:
        """Wait for everything; the gradients (flat, like ``masters``) in the stage's gradient layout."""
        for bucket in self.buckets[self._next:]:  # leaves whose hook did not fire (no gradient)
            for i in sorted(bucket.missing):
                self._put(bucket, i, self._local(i))
        self._launch_ready()
        while self._in_flight:
            self._collect(self._in_flight.popleft())
        after = {path: self._local(i) for i, (path, _) in enumerate(self.leaves) if self.kinds[i] == "after"}
        if after:
            after = reduce_gradients(after, zero_stage=self.zero_stage, data_dims=self.data_dims,
                                     reduce_axes=self.reduce_axes, mesh=self.mesh, dtype=self.dtype,
                                     limit_bytes=self.limit_bytes, gathered=self.gather is not None)
        results = {**self._results, **after}
        for i, (path, _) in enumerate(self.leaves):
            if self.kinds[i] in ("sink", "none"):
                results[path] = self._local(i)
        return {path: results[path] for path, _ in self.leaves}

    def _local(self, i: int) -> Tensor:
        """Leaf ``i``'s gradient as this rank holds it: from the sink (stage 3 split leaves, already
        summed over ``data``), else the locally accumulated ``.grad`` (zeros if it never got one)."""
        path, leaf = self.leaves[i]
        if self.gather is not None and self.data_dims[path] is not None:
            g = self.sink.grads.get(path)
            if g is None:
                shape = list(leaf.shape)
                return torch.zeros(shape, dtype=leaf.dtype, device=leaf.device)
            return g.to(leaf.dtype)
        return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)

