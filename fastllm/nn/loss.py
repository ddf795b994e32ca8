"""Next-token cross-entropy, computed in float32.

``loss = sum_t w_t * CE(logits_t, target_t) / sum_t w_t`` where ``w_t`` is zero for targets equal
to ``ignore_index`` (-100, the Hugging Face convention) and otherwise the optional ``loss_mask``
(bool or float). With no valid token the loss is 0, not NaN.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int, Shaped
from torch import Tensor

__all__ = ["IGNORE_INDEX", "cross_entropy"]

IGNORE_INDEX = -100


def cross_entropy(
    logits: Float[Tensor, "*batch vocab"],
    targets: Int[Tensor, "*batch"],
    *,
    loss_mask: Optional[Shaped[Tensor, "*batch"]] = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Float[Tensor, ""], Float[Tensor, ""]]:
    """(mean loss over valid tokens, total weight of valid tokens)."""
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    )  # [tokens], zero where ignored
    weight = (targets.reshape(-1) != ignore_index).float()
    if loss_mask is not None:
        weight = weight * loss_mask.reshape(-1).float()
    total = weight.sum()
    return (per_token * weight).sum() / total.clamp(min=torch.finfo(torch.float32).tiny), total
