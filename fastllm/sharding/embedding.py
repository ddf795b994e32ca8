"""ZeRO-3 token embedding without gathering the table: each data rank looks up the ids that fall in
its block of rows, for the tokens of every data rank.

The table ``[vocab, embed]`` is stored split over ``data`` along the vocabulary (whole rows). The
dense path all-gathers it before the lookup (~1 GB for Llama-8B, waited for at the start of a step,
nothing to hide it behind) and reduce-scatters its gradient after backward (~2 GB in fp32, waited
for at the end), although a step touches at most ``data * batch * seq`` rows. Here, with ``n`` data
ranks and ``t`` tokens per rank:

* forward: all-gather the token ids (``n t`` integers); look up the rows this rank holds for all of
  them (zeros elsewhere) and reduce-scatter the ``[n, t, embed]`` partial lookups: each rank
  receives its own tokens' embeddings, exactly (one rank contributes each row);
* backward: all-gather the output gradients ``[n, t, embed]`` and add each one into the row of this
  rank's block it came from, in the reduce dtype: the block's gradient summed over every data rank,
  with no reduce-scatter.

The gradient goes to the step's :class:`~fastllm.sharding.overlap.GradientSink` when one is bound
(as the ZeRO-3 gathers' reduce-scatters do), else back through autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastllm.sharding.mesh import Mesh
from fastllm.sharding.overlap import GradientSink, Pending, gather_async, reduce_scatter_async
from fastllm.sharding.tensor_parallel import rows_in_block, vocab_parallel_embedding

__all__ = ["sharded_lookup"]


class _ShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block: Tensor, ids: Tensor, mesh: Mesh, sink: Optional[GradientSink], path: str,
                reduce_dtype: torch.dtype):
        all_ids = gather_async(ids.reshape(-1), "data", mesh).wait()  # [n, tokens]
        partial = vocab_parallel_embedding(block, all_ids, mesh, axis="data")  # [n, tokens, embed]
        mine = reduce_scatter_async(partial.reshape(mesh.size("data"), -1), "data", mesh).wait()
        ctx.save_for_backward(*rows_in_block(all_ids, block.shape[0], mesh.rank("data")))
        ctx.mesh, ctx.sink, ctx.path, ctx.reduce_dtype = mesh, sink, path, reduce_dtype
        ctx.block_shape, ctx.block_dtype = block.shape, block.dtype
        return mine.view(*ids.shape, block.shape[1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        local, inside = ctx.saved_tensors
        grads = gather_async(grad_out.contiguous().reshape(-1), "data", ctx.mesh).wait()  # [n, tokens * embed]
        # Rows of other ranks' blocks add zeros to row 0: a boolean selection would sync with the host.
        grads = grads.view(-1, ctx.block_shape[1]).to(ctx.reduce_dtype) * inside.reshape(-1, 1)
        block_grad = torch.zeros(ctx.block_shape, dtype=ctx.reduce_dtype, device=grad_out.device)
        block_grad.index_add_(0, local.reshape(-1), grads)
        if ctx.sink is not None:
            ctx.sink.put(lambda results: {ctx.path: results[0]}, Pending(None, lambda: [block_grad]))
            return (None,) * 6
        return block_grad.to(ctx.block_dtype), None, None, None, None, None


def sharded_lookup(block: Tensor, ids: Tensor, mesh: Mesh, *, sink: Optional[GradientSink] = None,
                   path: str = "embed.tokens", reduce_dtype: torch.dtype = torch.float32) -> Tensor:
    """Embeddings ``[*ids.shape, embed]`` of this data rank's ``ids`` from the table whose rows
    ``[rank * rows, (rank + 1) * rows)`` are ``block`` (see the module docstring)."""
    return _ShardedLookup.apply(block, ids, mesh, sink, path, reduce_dtype)
