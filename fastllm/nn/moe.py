"""Sparse mixture of experts replacing the MLP (Shazeer et al. 2017; Mixtral, Jiang et al. 2024).

Routing, as transformers' Mixtral: ``probs = softmax(x W_router^T)`` in float32, the top-k experts
per token, their probabilities renormalised to sum to one when ``normalize_top_k``; the output is
``sum_k weight_k * expert_k(x)`` with SwiGLU experts. No token is dropped and nothing is padded to a
capacity: the reference below loops over experts, gathers the tokens each one was picked for
(``index_select``) and scatters the weighted results back (``index_add``). Where the layer's
``kernels.moe`` resolves to Triton, :func:`fastllm.kernels.moe.moe_experts` runs instead: tokens
sorted by expert, one grouped matmul launch per projection, no padding.

Auxiliary losses over the router logits of all layers (concatenated along tokens):
* load balancing (Switch Transformer, Fedus et al. 2021, eqs. 4-6, as transformers'
  ``load_balancing_loss_func``): ``n_experts * sum_e f_e * P_e`` with ``f_e`` the number of top-k
  assignments to expert ``e`` per token and ``P_e`` its mean router probability (so perfectly
  balanced routing scores ``top_k``);
* router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): ``mean_tokens(logsumexp(logits)^2)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from fastllm.kernels import KernelConfig, select
from fastllm.kernels.moe import moe_experts
from fastllm.nn.mlp import Activation, activation
from fastllm.nn.param import Param, normal

__all__ = ["MoE", "params", "apply", "route", "router_statistics", "losses_from_statistics", "load_balancing_loss",
           "router_z_loss"]


@dataclass(frozen=True)
class MoE:
    embed_dim: int
    mlp_dim: int
    n_experts: int
    top_k: int
    normalize_top_k: bool = True
    activation: Activation = "silu"
    std: float = 0.02
    out_std: Optional[float] = None
    kernels: KernelConfig = KernelConfig()  # which implementation runs the experts

    def __post_init__(self):
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, n_experts={self.n_experts}]")
        activation(self.activation)


def params(layer: MoE) -> dict:
    x, e, m = layer.n_experts, layer.embed_dim, layer.mlp_dim
    out_std = layer.std if layer.out_std is None else layer.out_std
    return {
        "router": Param((x, e), ("experts", "embed"), normal(layer.std)),
        "w_up": Param((x, m, e), ("experts", "mlp", "embed"), normal(layer.std)),
        "w_gate": Param((x, m, e), ("experts", "mlp", "embed"), normal(layer.std)),
        "w_down": Param((x, e, m), ("experts", "embed", "mlp"), normal(out_std)),
    }


def route(
    layer: MoE, router_logits: Float[Tensor, "tokens experts"]
) -> tuple[Float[Tensor, "tokens k"], Tensor]:
    """(float32 weights, expert indices), each ``[tokens, top_k]``."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, layer.top_k, dim=-1)
    if layer.normalize_top_k:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def apply(
    layer: MoE, p: dict, x: Float[Tensor, "*batch embed"]
) -> tuple[Float[Tensor, "*batch embed"], Float[Tensor, "tokens experts"]]:
    """(output, router logits ``[tokens, experts]`` for the auxiliary losses). Runs on whole experts
    and whole sequences: the partitioner refuses layouts that would split them (expert parallelism
    is planned as rules on ``experts``, with an all-to-all dispatch)."""
    flat = x.reshape(-1, x.shape[-1])  # [tokens, embed]
    router_logits = F.linear(flat, p["router"])  # [tokens, experts]
    weights, experts = route(layer, router_logits)
    if flat.device.type == "meta":  # planning: only the shape (the routing is data-dependent)
        return torch.zeros_like(x), router_logits
    if select(layer.kernels, "moe", x.device) == "triton":
        out = moe_experts(flat, weights, experts, p["w_gate"], p["w_up"], p["w_down"],
                          activation=layer.activation, impl="triton")
    else:
        out = _experts_reference(layer, p, flat, weights, experts)
    return out.reshape(x.shape), router_logits


def _experts_reference(layer: MoE, p: dict, flat: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
    act = activation(layer.activation)
    out = torch.zeros_like(flat)
    for e in range(layer.n_experts):
        token, slot = torch.where(experts == e)  # the tokens that picked expert e, and in which slot
        picked = flat.index_select(0, token)  # [n_e, embed]
        hidden = act(F.linear(picked, p["w_gate"][e])) * F.linear(picked, p["w_up"][e])
        y = F.linear(hidden, p["w_down"][e]) * weights[token, slot, None]  # float32 weights
        out = out.index_add(0, token, y.to(out.dtype))
    return out


def router_statistics(
    router_logits: Float[Tensor, "tokens experts"], top_k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sums over one layer's tokens: top-k assignments per expert ``[experts]``, router
    probabilities per expert ``[experts]``, ``logsumexp(logits)^2`` and the number of tokens (all
    float32). Summed over layers they give both auxiliary losses (:func:`losses_from_statistics`),
    so a model carries four small tensors from block to block instead of every layer's logits."""
    logits = router_logits.float()
    probs = torch.softmax(logits, dim=-1)
    _, picked = torch.topk(probs, top_k, dim=-1)
    assignments = F.one_hot(picked, logits.shape[-1]).sum(dim=1).float()  # [tokens, experts]
    rows = torch.tensor(float(logits.shape[0]), device=logits.device)
    return assignments.sum(0), probs.sum(0), torch.logsumexp(logits, dim=-1).square().sum(), rows


def losses_from_statistics(tokens_per_expert: Tensor, probs: Tensor, lse_squared: Tensor, rows: Tensor, *,
                           n_experts: int) -> dict[str, Tensor]:
    """``moe_aux_loss`` (load balancing) and ``router_z_loss`` from :func:`router_statistics` sums."""
    rows = rows.clamp(min=1.0)
    return {"moe_aux_loss": n_experts * torch.sum((tokens_per_expert / rows) * (probs / rows)),
            "router_z_loss": lse_squared / rows}


def load_balancing_loss(
    router_logits: Sequence[Tensor], n_experts: int, top_k: int
) -> Float[Tensor, ""]:
    """Over the router logits of every layer, concatenated along tokens (the module docstring)."""
    stats = [router_statistics(r, top_k) for r in router_logits]
    sums = [sum(column) for column in zip(*stats)]
    return losses_from_statistics(*sums, n_experts=n_experts)["moe_aux_loss"]


def router_z_loss(router_logits: Sequence[Tensor]) -> Float[Tensor, ""]:
    logits = torch.cat([r.float() for r in router_logits], dim=0)
    return torch.logsumexp(logits, dim=-1).square().mean()
