"""The parallel activation layout: Megatron's collectives at the hooks of :mod:`fastllm.nn.layout`.

Tensor parallelism (Shoeybi et al. 2019, "Megatron-LM", sec. 3): attention heads and MLP units are
split over the ``tensor`` axis. A column-parallel matmul's input enters through *f* (identity
forward, all-reduce backward) and a row-parallel matmul's partial sums leave through *g*
(all-reduce forward, identity backward). With sequence parallelism (Korthikanti et al. 2022,
sec. 4.2.2) the residual stream between the parallel regions holds a block of the sequence: *f*
becomes an all-gather over ``seq`` (backward reduce-scatter) and *g* a reduce-scatter (backward
all-gather), so norms and residual adds run on ``seq / tensor`` tokens.

Vocab-parallel embedding: each rank looks up the ids that fall in its block of rows (zeros
elsewhere) and *g* sums the blocks. Vocab-parallel cross-entropy: with local logits ``x`` over the
rank's vocab block, ``lse = m + log sum_ranks sum_j exp(x_j - m)`` with ``m`` the all-reduced max
(no gradient: the result does not depend on it), the target logit is taken by the one rank whose
block holds it, and both sums are all-reduced with identity backward: the full ``[tokens, vocab]``
logits are never gathered. Where the model's ``kernels.cross_entropy`` resolves to Triton,
``linear_cross_entropy`` runs the fused kernel on the rank's vocab block (``VocabShard``): the same
statistics are all-reduced per chunk, and not even the local ``[tokens, vocab / tensor]`` logits exist.

ZeRO-3 (Rajbhandari et al. 2020): ``params(path, p)`` all-gathers a part of the model's parameters
over ``data`` just before it is used (``unshard``'s backward reduce-scatters their gradients).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from fastllm import nn
from fastllm.kernels import Choice, VocabShard, resolve
from fastllm.sharding import collectives as C
from fastllm.sharding.mesh import Mesh

__all__ = ["ParallelLayout", "rows_in_block", "vocab_parallel_embedding", "vocab_parallel_cross_entropy"]

SEQ_DIM = 1  # activations are [batch, seq, ...]


def rows_in_block(ids: Tensor, rows: int, rank: int) -> tuple[Tensor, Tensor]:
    """(``ids`` as indices into rank ``rank``'s block of ``rows`` consecutive rows, 0 where outside;
    whether each id falls inside the block)."""
    local = ids - rank * rows
    inside = (local >= 0) & (local < rows)
    return torch.where(inside, local, 0), inside


def vocab_parallel_embedding(table: Tensor, ids: Tensor, mesh: Mesh, axis: str = "tensor") -> Tensor:
    """``table`` is this rank's block of rows ``[vocab / ranks, embed]`` along ``axis``; the result
    holds the partial lookup (zeros for ids outside the block), to be summed over ``axis``."""
    local, inside = rows_in_block(ids, table.shape[0], mesh.rank(axis))
    out = F.embedding(local, table)  # [..., embed]
    return out * inside.unsqueeze(-1).to(out.dtype)


def _max_over_tensor(x: Tensor, mesh: Mesh) -> Tensor:
    if mesh.size("tensor") == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=mesh.group("tensor"))
    return x


def vocab_parallel_cross_entropy(
    logits: Tensor, targets: Tensor, loss_mask: Optional[Tensor], mesh: Mesh, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """:func:`fastllm.nn.cross_entropy` of logits whose last dim is this rank's vocab block."""
    x = logits.reshape(-1, logits.shape[-1]).float()  # [tokens, vocab / tensor]
    targets = targets.reshape(-1)
    top = _max_over_tensor(x.detach().amax(-1), mesh)  # [tokens]
    sum_exp = C.all_reduce((x - top[:, None]).exp().sum(-1), "tensor", mesh)
    local, inside = rows_in_block(targets, x.shape[-1], mesh.rank("tensor"))
    picked = x.gather(1, local[:, None])[:, 0] * inside
    picked = C.all_reduce(picked, "tensor", mesh)
    per_token = top + sum_exp.log() - picked
    weight = (targets != ignore_index).float()
    if loss_mask is not None:
        weight = weight * loss_mask.reshape(-1).float()
    total = weight.sum()
    return (per_token * weight).sum() / total.clamp(min=torch.finfo(torch.float32).tiny), total


class ParallelLayout:
    """Implements :class:`fastllm.nn.layout.Layout` for a mesh (see the module docstring).

    ``gather`` maps a params part's path (``"embed"``, ``"layers.3"``...) to a function that turns
    the stored part into the compute layout (ZeRO-3), or is ``None`` when params are stored as
    they are used.
    """

    def __init__(self, mesh: Mesh, *, sequence_parallel: bool = False, gather=None):
        self.mesh = mesh
        self.sequence_parallel = sequence_parallel and mesh.size("tensor") > 1
        self.gather = gather

    def params(self, path: str, p: Any) -> Any:
        return p if self.gather is None else self.gather(path, p)

    def embed(self, table: Tensor, ids: Tensor) -> Tensor:
        looked_up = getattr(self.gather, "lookup", None)  # ZeRO-3 prefetch: from the table's storage block
        out = None if looked_up is None else looked_up(table, ids)
        if out is not None:
            return out
        if self.mesh.size("tensor") == 1:
            return F.embedding(ids, table)
        return self.exit_parallel(vocab_parallel_embedding(table, ids, self.mesh))

    def local_seq(self, x: Tensor) -> Tensor:
        if not self.sequence_parallel:
            return x
        n, me = self.mesh.size("tensor"), self.mesh.rank("tensor")
        return x.chunk(n, SEQ_DIM)[me]

    def enter_parallel(self, x: Tensor) -> Tensor:
        if self.sequence_parallel:
            return C.all_gather(x, SEQ_DIM, "tensor", self.mesh)
        return C.copy_to_parallel(x, "tensor", self.mesh)

    def exit_parallel(self, y: Tensor) -> Tensor:
        if self.sequence_parallel:
            return C.reduce_scatter(y, SEQ_DIM, "tensor", self.mesh)
        return C.all_reduce(y, "tensor", self.mesh)

    def cross_entropy(self, logits: Tensor, targets: Tensor, loss_mask: Optional[Tensor]):
        return vocab_parallel_cross_entropy(logits, targets, loss_mask, self.mesh)


    def linear_cross_entropy(self, hidden: Tensor, head: Tensor, targets: Tensor,
                             loss_mask: Optional[Tensor], impl: Choice):
        h = self.enter_parallel(hidden)  # every token; backward sums the shards' partial dh
        if resolve(impl, h.device) == "torch":
            return self.cross_entropy(F.linear(h, head), targets, loss_mask)
        n = self.mesh.size("tensor")
        shard = None if n == 1 else VocabShard(self.mesh.rank("tensor") * head.shape[0], head.shape[0] * n,
                                               self.mesh.group("tensor"))
        return nn.loss.linear_cross_entropy(h, head, targets, loss_mask=loss_mask, shard=shard, impl=impl)
