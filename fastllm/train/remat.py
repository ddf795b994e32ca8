"""Per-block activation recomputation (Chen et al. 2016, "Training deep nets with sublinear memory").

Each decoder block runs under ``torch.utils.checkpoint``: its inner activations are dropped after
the forward pass and recomputed during backward, so activation memory is one residual stream per
block instead of every intermediate. The loss equals :func:`fastllm.models.loss` exactly; only the
time/memory trade changes. This walks the same layers as ``fastllm.models.decoder.forward`` (the
model exposes its blocks), wrapping each block call.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fastllm import nn
from fastllm.models.config import ModelConfig
from fastllm.models.decoder import block_layer, rotary_layer

__all__ = ["loss_with_block_remat"]


def _hidden(config: ModelConfig, params: dict, batch: dict) -> tuple[Tensor, list[Tensor]]:
    tokens = batch["tokens"]
    positions = batch.get("positions")
    if positions is None:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
    h = nn.embedding.apply(params["embed"]["tokens"], tokens)  # [batch, seq, embed]
    if config.positions == "learned":
        h = h + nn.embedding.apply(params["embed"]["positions"], positions)
    rot = rotary_layer(config)
    rope = None if rot is None else nn.rotary.cos_sin(rot, positions, dtype=h.dtype)
    router_logits = []
    for index, layer_params in enumerate(params["layers"]):
        block = functools.partial(nn.block.apply, block_layer(config, index))
        h, logits_of_router = checkpoint(
            block, layer_params, h, rope=rope, segment_ids=batch.get("segment_ids"), use_reentrant=False
        )
        if logits_of_router is not None:
            router_logits.append(logits_of_router)
    return nn.norm.apply(params["final_norm"], h, eps=config.norm_eps), router_logits


def loss_with_block_remat(config: ModelConfig, params: dict, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
    """``fastllm.models.loss`` with every block's activations recomputed in backward."""
    h, router_logits = _hidden(config, params, batch)
    head = params["embed"]["tokens"] if config.tie_embeddings else params["lm_head"]["w"]
    logits = nn.linear.linear(h, head)  # [batch, seq, vocab]
    ce, valid = nn.cross_entropy(logits, batch["targets"], loss_mask=batch.get("loss_mask"))
    total = ce
    if router_logits:
        moe = config.moe
        total = total + moe.aux_loss_coef * nn.moe.load_balancing_loss(router_logits, moe.n_experts, moe.top_k)
        total = total + moe.z_loss_coef * nn.moe.router_z_loss(router_logits)
    return total, {"loss": total.detach(), "cross_entropy": ce.detach(), "valid_tokens": valid.detach()}
