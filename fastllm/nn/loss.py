"""Next-token cross-entropy, computed in float32.

``loss = sum_t w_t * CE(logits_t, target_t) / sum_t w_t`` where ``w_t`` is zero for targets equal
to ``ignore_index`` (-100, the Hugging Face convention) and otherwise the optional ``loss_mask``
(bool or float). With no valid token the loss is 0, not NaN.

:func:`linear_cross_entropy` takes the hidden states and the LM head instead of the logits, so the
fused kernel (:func:`fastllm.kernels.fused_linear_cross_entropy`, chosen by ``impl``) can compute
the same loss chunk by chunk without ever holding the ``[tokens, vocab]`` logits.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int, Shaped
from torch import Tensor

from fastllm.kernels import Choice, VocabShard, fused_linear_cross_entropy, resolve
from fastllm.kernels.cross_entropy import cross_entropy_reference, token_weights

__all__ = ["IGNORE_INDEX", "cross_entropy", "linear_cross_entropy"]

IGNORE_INDEX = -100


def cross_entropy(
    logits: Float[Tensor, "*batch vocab"],
    targets: Int[Tensor, "*batch"],
    *,
    loss_mask: Optional[Shaped[Tensor, "*batch"]] = None,
    ignore_index: int = IGNORE_INDEX,
    shard: Optional[VocabShard] = None,
) -> tuple[Float[Tensor, ""], Float[Tensor, ""]]:
    """(mean loss over valid tokens, total weight of valid tokens). ``shard``: ``logits`` are this
    rank's block of the vocabulary (the softmax statistics are summed over its group)."""
    if shard is not None:
        total = token_weights(targets, ignore_index, loss_mask).sum()
        return cross_entropy_reference(logits, targets, ignore_index=ignore_index, shard=shard,
                                       loss_mask=loss_mask).float(), total
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    )  # [tokens], zero where ignored
    weight = token_weights(targets, ignore_index, loss_mask)
    total = weight.sum()
    return (per_token * weight).sum() / total.clamp(min=torch.finfo(torch.float32).tiny), total


def linear_cross_entropy(
    hidden: Float[Tensor, "*batch embed"],
    head: Float[Tensor, "vocab embed"],
    targets: Int[Tensor, "*batch"],
    *,
    loss_mask: Optional[Shaped[Tensor, "*batch"]] = None,
    ignore_index: int = IGNORE_INDEX,
    shard: Optional[VocabShard] = None,
    impl: Choice = "auto",
) -> tuple[Float[Tensor, ""], Float[Tensor, ""]]:
    """:func:`cross_entropy` of ``hidden @ head^T``, as (mean loss, total weight of valid tokens).

    ``impl`` resolved to Triton: the fused kernel, logits never materialised; ``shard``: ``head`` is
    this rank's block of vocab rows (the kernel all-reduces its row statistics over the group). The
    torch path is ``cross_entropy(F.linear(hidden, head))``; with a shard, the kernel's reference.
    """
    if resolve(impl, hidden.device) == "torch" and shard is None:
        return cross_entropy(F.linear(hidden, head), targets, loss_mask=loss_mask, ignore_index=ignore_index)
    total = token_weights(targets, ignore_index, loss_mask).sum()
    loss = fused_linear_cross_entropy(hidden, head, targets, ignore_index=ignore_index, shard=shard,
                                      loss_mask=loss_mask, impl=impl)
    return loss.float(), total
