"""Data parallelism with ZeRO (Rajbhandari et al. 2020): bucketed gradient reduction, storage
slices of the compute shards, and the all-gather of updated shards.

Gradients are summed over ``data`` in ``reduce_dtype`` in a few large flat buffers (one collective
per bucket instead of one per tensor):

* into the compute layout (stages 0, 1): all-reduce;
* into the storage layout (stage 2): reduce-scatter. A buffer ``[data, n]`` holds, in row ``r``,
  the blocks of every gradient that data rank ``r`` keeps, so one reduce-scatter of the rows hands
  each rank the sum of its blocks;
* stage 3: the all-gather of the parameters already reduce-scattered them in its backward; only
  the parameters too small to split over ``data`` are all-reduced.

Under sequence parallelism the parameters that are not split over ``tensor`` (norms, output
biases, learned positions) saw only this rank's block of tokens: their gradients are also summed
over ``tensor``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fastllm import tree
from fastllm.kernels.optim import global_norm as kernel_global_norm
from fastllm.sharding import collectives as C
from fastllm.sharding.mesh import AXES, Mesh
from fastllm.sharding.spec import is_spec

__all__ = ["reduce_gradients", "to_storage", "to_compute", "global_norm", "all_reduce_flat"]


def _buckets(tensors: list[Tensor], limit_bytes: int) -> list[list[int]]:
    """Indices of ``tensors`` grouped into runs of at most ``limit_bytes`` (at least one each)."""
    groups, size = [[]], 0
    for index, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > limit_bytes:
            groups.append([])
            size = 0
        groups[-1].append(index)
        size += nbytes
    return [g for g in groups if g]


def all_reduce_flat(tensors: list[Tensor], axis: str, mesh: Mesh, dtype: torch.dtype, limit_bytes: int) -> list[Tensor]:
    """Sum each tensor over ``axis``, a few flat buffers at a time; results in the inputs' dtypes."""
    if mesh.size(axis) == 1 or not tensors:
        return list(tensors)
    out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for group in _buckets(tensors, limit_bytes):
        flat = torch.cat([tensors[i].reshape(-1).to(dtype) for i in group])
        dist.all_reduce(flat, group=mesh.group(axis))
        for i, part in zip(group, flat.split([tensors[i].numel() for i in group])):
            out[i] = part.view(tensors[i].shape).to(tensors[i].dtype)
    return out


def _reduce_scatter_flat(
    pairs: list[tuple[Tensor, int]], mesh: Mesh, dtype: torch.dtype, limit_bytes: int
) -> list[Tensor]:
    """Sum over ``data`` and keep this rank's block along each tensor's dim (``(tensor, dim)``)."""
    n = mesh.size("data")
    if n == 1:
        return [t for t, _ in pairs]
    out: list[Tensor] = [None] * len(pairs)  # type: ignore[list-item]
    for group in _buckets([t for t, _ in pairs], limit_bytes):
        rows = torch.cat(
            [torch.stack([b.reshape(-1) for b in pairs[i][0].to(dtype).chunk(n, pairs[i][1])]) for i in group],
            dim=1,
        )  # [data, sum of block sizes]: row r holds what data rank r keeps
        mine = C._reduce_scatter0(rows, mesh.group("data"), n)[0]
        for i, part in zip(group, mine.split([pairs[i][0].numel() // n for i in group])):
            t, dim = pairs[i]
            shape = list(t.shape)
            shape[dim] //= n
            out[i] = part.view(shape).to(t.dtype)
    return out


def _all_gather_flat(pairs: list[tuple[Tensor, int]], mesh: Mesh, limit_bytes: int) -> list[Tensor]:
    """Inverse of the storage slice: concatenate every data rank's block along each tensor's dim."""
    n = mesh.size("data")
    if n == 1:
        return [t for t, _ in pairs]
    out: list[Tensor] = [None] * len(pairs)  # type: ignore[list-item]
    for group in _buckets([t for t, _ in pairs], limit_bytes):
        dtype = pairs[group[0]][0].dtype
        flat = torch.cat([pairs[i][0].reshape(-1).to(dtype) for i in group])
        rows = C._gather0(flat, mesh.group("data"), n).view(n, -1)  # [data, sum of block sizes]
        for i, part in zip(group, rows.split([pairs[i][0].numel() for i in group], dim=1)):
            t, dim = pairs[i]
            blocks = [row.view(t.shape) for row in part.unbind(0)]
            out[i] = torch.cat(blocks, dim=dim).to(t.dtype)
    return out


def _slice(t: Tensor, dim: int | None, mesh: Mesh) -> Tensor:
    if dim is None or mesh.size("data") == 1:
        return t
    return t.chunk(mesh.size("data"), dim)[mesh.rank("data")].contiguous()


def to_storage(values: Any, data_dims: dict[str, int | None], mesh: Mesh) -> Any:
    """Compute-layout shards -> this rank's storage blocks (a slice along the ``data`` dim)."""
    return tree.map_with_path(lambda path, t: _slice(t, data_dims[path], mesh), values)


def to_compute(values: Any, data_dims: dict[str, int | None], mesh: Mesh, limit_bytes: int) -> Any:
    """Storage blocks -> compute-layout shards (bucketed all-gather over ``data``, no autograd)."""
    flat = tree.leaves_with_path(values)
    split = [(i, t, data_dims[path]) for i, (path, t) in enumerate(flat) if data_dims[path] is not None]
    gathered = _all_gather_flat([(t, dim) for _, t, dim in split], mesh, limit_bytes)
    leaves = [t for _, t in flat]
    for (i, _, _), g in zip(split, gathered):
        leaves[i] = g
    return tree.with_leaves(values, leaves)


def reduce_gradients(
    grads: dict[str, Tensor],
    *,
    zero_stage: int,
    data_dims: dict[str, int | None],
    reduce_axes: dict[str, frozenset],
    mesh: Mesh,
    dtype: torch.dtype = torch.float32,
    limit_bytes: int = 64 << 20,
    gathered: bool = False,
) -> dict[str, Tensor]:
    """Per-rank partial gradients (flat) -> their sums over each leaf's ``reduce_axes``, in the
    gradient layout of the stage: all-reduced over every axis but ``data``; over ``data``
    all-reduced (stages 0 and 1, and leaves too small to split), reduce-scattered (stage 2) or,
    when ``gathered`` (stage 3: the gathers' backward reduce-scattered them), left as they are."""
    out = dict(grads)
    for axis in [a for a in AXES if a != "data"]:
        paths = [p for p in out if axis in reduce_axes[p]]
        for path, g in zip(paths, all_reduce_flat([out[p] for p in paths], axis, mesh, dtype, limit_bytes)):
            out[path] = g
    summed = [p for p in out if "data" in reduce_axes[p]]
    split = [p for p in summed if data_dims[p] is not None and zero_stage >= 2]
    if zero_stage == 2:
        scattered = _reduce_scatter_flat([(out[p], data_dims[p]) for p in split], mesh, dtype, limit_bytes)
        out.update(zip(split, scattered))
    elif zero_stage >= 3 and not gathered and split:
        raise ValueError("ZeRO-3 gradients of split leaves come from the gathers' backward (gathered=True)")
    whole = [p for p in summed if p not in split]
    out.update(zip(whole, all_reduce_flat([out[p] for p in whole], "data", mesh, dtype, limit_bytes)))
    return out


def _one_pass(tensors: list[Tensor]) -> bool:
    """Whether ``kernels.global_norm`` takes these as they are: CUDA, one float dtype, contiguous."""
    first = tensors[0]
    return first.is_cuda and first.dtype in (torch.float32, torch.bfloat16) and all(
        t.dtype == first.dtype and t.device == first.device and t.is_contiguous() for t in tensors)


def global_norm(values: Any, specs: Any, mesh: Mesh, stages: Optional[dict[str, tuple[int, ...]]] = None) -> Tensor:
    """sqrt of the sum of squares of the *global* tensors whose shards ``values`` holds.

    A shard replicated along some mesh axes is counted by the rank at coordinate 0 of those axes
    only, then one all-reduce over the world adds the owners' sums. ``stages``: the pipeline ranks
    holding each leaf (a leaf of another stage is ``None`` here): along ``pipe`` the first holder
    counts it.
    """
    flat_specs = tree.flatten(specs, is_leaf=is_spec)
    owned = []
    for path, t in tree.leaves_with_path(values):
        replicated = [axis for axis in AXES if axis not in flat_specs[path].used_axes]
        if stages is not None:
            replicated.remove("pipe")
            if mesh.rank("pipe") != stages[path][0]:
                continue
        if all(mesh.rank(axis) == 0 for axis in replicated):
            owned.append(t)
    if owned and _one_pass(owned):  # Triton's multi-tensor norm: one launch instead of ~300
        squares = kernel_global_norm(owned).to(torch.float32).square()
    elif owned:
        norms = torch._foreach_norm(owned, 2, dtype=torch.float32)
        squares = torch.stack(norms).square().sum()
    else:
        squares = torch.zeros((), dtype=torch.float32, device=mesh.device)
    if mesh.world_size > 1:
        squares = squares.clone()
        dist.all_reduce(squares)
    return squares.sqrt()

