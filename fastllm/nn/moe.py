"""Sparse mixture of experts replacing the MLP (Shazeer et al. 2017; Mixtral, Jiang et al. 2024).

Routing, as transformers' Mixtral: ``probs = softmax(x W_router^T)`` in float32, the top-k experts
per token, their probabilities renormalised to sum to one when ``normalize_top_k``; the output is
``sum_k weight_k * expert_k(x)`` with SwiGLU experts. Three operations on named dims
(:mod:`fastllm.nn.ops`), one code path on one device and under any layout:

* **dispatch**: each token's rows, sorted by expert (:func:`fastllm.kernels.moe_dispatch`), as a
  :class:`~fastllm.nn.ops.Ragged` tensor ``(experts, *token dims, embed)`` made where the tokens
  are (it needs every expert: ``whole=("experts",)``);
* **experts**: one grouped matmul per projection over each expert's rows, no padding
  (:func:`fastllm.kernels.grouped_matmul`), where the rules put the experts: with
  ``("experts", "data")`` the layout moves the routed rows there by an all-to-all with variable
  splits and back, derived like every other move (expert parallelism);
* **combine**: each token's expert outputs weighted and summed (:func:`fastllm.kernels.moe_combine`)
  where the tokens are.

Dropless by default: nothing is dropped and nothing padded. With ``capacity_factor`` each expert
takes at most ``ceil(capacity_factor * seq * top_k / n_experts)`` of one sequence's picks (earlier
tokens first; the sequence as the rank holds it when ``seq`` is split), the rest contribute
nothing, and the fraction dropped is reported.

Auxiliary losses over the router logits of all layers (every token of the global micro-batch):
* load balancing (Switch Transformer, Fedus et al. 2021, eqs. 4-6, as transformers'
  ``load_balancing_loss_func``): ``n_experts * sum_e f_e * P_e`` with ``f_e`` the number of top-k
  assignments to expert ``e`` per token and ``P_e`` its mean router probability (so perfectly
  balanced routing scores ``top_k``);
* router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): ``mean_tokens(logsumexp(logits)^2)``.
A block returns per-token statistics (:func:`token_statistics`), summed over the layers by the
model; :func:`aux_losses` sums them over the tokens in one operation, which under a layout adds
every rank's share (an all-reduce whose backward adds the gradients of every rank's loss).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from fastllm.kernels import KernelConfig, grouped_matmul, make_routing, moe_combine, moe_dispatch, select
from fastllm.kernels.activation import gated
from fastllm.nn import ops
from fastllm.nn.mlp import Activation, activation
from fastllm.nn.param import Param, normal

__all__ = ["MoE", "AXES", "STATISTICS", "params", "apply", "route", "over_capacity", "token_statistics", "aux_losses",
           "losses_from_statistics", "load_balancing_loss", "router_z_loss"]

# The weights' logical dims, declared once: params() uses them, and so do the operations in apply().
AXES: dict[str, ops.Axes] = {"router": ("router", "embed"), "w_up": ("experts", "mlp", "embed"),
                             "w_gate": ("experts", "mlp", "embed"), "w_down": ("experts", "embed", "mlp")}


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
    capacity_factor: Optional[float] = None  # None: dropless
    kernels: KernelConfig = KernelConfig()  # which implementation runs the experts

    def __post_init__(self):
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, n_experts={self.n_experts}]")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {self.capacity_factor}")
        activation(self.activation)


def params(layer: MoE) -> dict:
    x, e, m = layer.n_experts, layer.embed_dim, layer.mlp_dim
    out_std = layer.std if layer.out_std is None else layer.out_std
    return {
        "router": Param((x, e), AXES["router"], normal(layer.std)),
        "w_up": Param((x, m, e), AXES["w_up"], normal(layer.std)),
        "w_gate": Param((x, m, e), AXES["w_gate"], normal(layer.std)),
        "w_down": Param((x, e, m), AXES["w_down"], normal(out_std)),
    }


def route(
    layer: MoE, router_logits: Float[Tensor, "*tokens experts"]
) -> tuple[Float[Tensor, "*tokens k"], Tensor]:
    """(float32 weights, expert indices), each ``[*tokens, top_k]``."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, layer.top_k, dim=-1)
    if layer.normalize_top_k:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def over_capacity(layer: MoE, experts: Int[Tensor, "*batch seq k"]) -> Tensor:
    """``experts`` with every pick beyond its expert's capacity in its sequence set to ``n_experts``
    (dropped); picks count in token order, a token's choices in rank order. Dropless: unchanged."""
    if layer.capacity_factor is None:
        return experts
    *batch, seq, k = experts.shape
    capacity = math.ceil(layer.capacity_factor * seq * k / layer.n_experts)
    picks = experts.reshape(-1, seq * k)  # [sequences, slots]
    one_hot = F.one_hot(picks, layer.n_experts)  # [sequences, slots, experts]
    position = ((one_hot.cumsum(1) - 1) * one_hot).sum(-1)  # each pick's place in its expert's queue
    return torch.where(position < capacity, picks, layer.n_experts).view(experts.shape)


def _routing(layer: MoE, logits: Tensor) -> tuple[Tensor, Tensor]:
    """(weights, bins ``[tokens, k]``) of a block of tokens: bin ``n_experts`` holds dropped picks."""
    weights, experts = route(layer, logits)
    bins = over_capacity(layer, experts)
    return weights.reshape(-1, layer.top_k), bins.reshape(-1, layer.top_k)


def _bins(layer: MoE) -> int:
    return layer.n_experts + (layer.capacity_factor is not None)


def _dispatch(layer: MoE, shards: ops.Shards, x: Tensor, logits: Tensor) -> ops.Ragged:
    """This rank's tokens' rows sorted by expert (every expert: the op keeps ``experts`` whole)."""
    flat = x.reshape(-1, x.shape[-1])  # [tokens, embed]
    counts_shape = (layer.n_experts,) + (1,) * (x.ndim - 1)  # one block of tokens per token dim
    if x.device.type == "meta":  # planning: shapes only (routing depends on values)
        return ops.Ragged(flat.new_empty((flat.shape[0] * layer.top_k, flat.shape[1])),
                          torch.empty(counts_shape, dtype=torch.int64, device="meta"))
    _, bins = _routing(layer, logits)
    routing = make_routing(bins, _bins(layer))
    rows = moe_dispatch(flat, routing, impl=select(layer.kernels, "moe", x.device))  # [tokens * k, embed]
    counts = routing.offsets.diff()[:layer.n_experts]
    if layer.capacity_factor is not None:  # the dropped picks sort last: no expert gets them
        rows = rows[:int(routing.offsets[layer.n_experts])]
    return ops.Ragged(rows, counts.view(counts_shape))


def _experts(layer: MoE, shards: ops.Shards, xs: ops.Ragged, w_gate: Tensor, w_up: Tensor,
             w_down: Tensor) -> ops.Ragged:
    """The local experts on their rows: ``down(act(gate x) * up x)``, one grouped matmul each."""
    if xs.rows.device.type == "meta":
        return xs.with_rows(xs.rows.new_empty((xs.rows.shape[0], w_down.shape[1])))
    impl = select(layer.kernels, "moe", xs.rows.device)
    offsets = F.pad(torch.cumsum(xs.per_group(), 0), (1, 0))  # [local experts + 1]
    hidden = gated(grouped_matmul(xs.rows, w_gate, offsets, impl=impl),
                   grouped_matmul(xs.rows, w_up, offsets, impl=impl), layer.activation, impl=impl)
    return xs.with_rows(grouped_matmul(hidden, w_down, offsets, impl=impl))


def _combine(layer: MoE, shards: ops.Shards, ys: ops.Ragged, logits: Tensor) -> Tensor:
    """Each token's expert outputs (back in dispatch order) weighted and summed."""
    shape = (*logits.shape[:-1], ys.rows.shape[-1])
    if logits.device.type == "meta":
        return ys.rows.new_empty(shape)
    weights, bins = _routing(layer, logits)
    rows = ys.rows
    dropped = bins.numel() - rows.shape[0]
    if dropped:  # a dropped pick's row is zero: it adds nothing, and its weight gets no gradient
        rows = torch.cat([rows, rows.new_zeros((dropped, rows.shape[1]))])
    routing = make_routing(bins, _bins(layer))
    return moe_combine(rows, weights, routing, impl=select(layer.kernels, "moe", rows.device)).view(shape)


def apply(
    layer: MoE, p: dict, x: Float[Tensor, "*batch embed"], *, layout: Optional[ops.Layout] = None,
    x_axes: ops.Axes = ops.STREAM,
) -> tuple[Float[Tensor, "*batch embed"], Float[Tensor, "*batch experts"]]:
    """(output, router logits ``[*tokens, n_experts]`` for the auxiliary losses). ``layout`` (see
    :mod:`fastllm.nn.ops`): ``x``'s dims are ``x_axes`` (the residual stream)."""
    tokens = tuple(x_axes[:-1])
    logits = ops.dense(layout, x, x_axes, p["router"], AXES["router"])  # [*tokens, experts]
    logits_axes = ops.dense_axes(x_axes, AXES["router"])
    routed = ("experts", *tokens, x_axes[-1])  # the dispatched rows: (experts, *token blocks, embed)
    xs, = ops.local(layout, functools.partial(_dispatch, layer),
                    [ops.activation(x, x_axes), ops.activation(logits, logits_axes)], [routed],
                    whole=("experts",), name="moe dispatch")
    weights = [ops.param(p[name], AXES[name]) for name in ("w_gate", "w_up", "w_down")]
    # inner: the hidden units [rows, mlp] between the projections (mlp split or the rows, never both)
    ys, = ops.local(layout, functools.partial(_experts, layer), [ops.activation(xs, routed), *weights], [routed],
                    inner=[("experts", *tokens, "mlp")], name="moe experts")
    out, = ops.local(layout, functools.partial(_combine, layer),
                     [ops.activation(ys, routed), ops.activation(logits, logits_axes)], [x_axes],
                     whole=("experts",), name="moe combine")
    return out, logits


# --- router statistics and the auxiliary losses ------------------------------------------------------
STATISTICS = ("moe_tokens_per_expert", "moe_probs", "moe_lse_squared", "moe_dropped")


def token_statistics(layer: MoE, router_logits: Float[Tensor, "*tokens experts"]) -> dict[str, Tensor]:
    """Per token (float32): its top-k assignments per expert ``[*tokens, experts]``, its router
    probabilities, ``logsumexp(logits)^2`` and how many of its picks were dropped (``[*tokens]``).
    Summed over layers and tokens they give the auxiliary losses (:func:`aux_losses`), so a model
    carries these small tensors from block to block instead of every layer's logits."""
    logits = router_logits.float()
    probs = torch.softmax(logits, dim=-1)
    _, picked = torch.topk(probs, layer.top_k, dim=-1)
    assignments = F.one_hot(picked, layer.n_experts).sum(-2).float()
    dropped = (over_capacity(layer, picked) == layer.n_experts).sum(-1).float()
    return dict(zip(STATISTICS, (assignments, probs, torch.logsumexp(logits, dim=-1).square(), dropped)))


def _sums(n_layers: int, shards: ops.Shards, assignments: Tensor, probs: Tensor, lse_squared: Tensor,
          dropped: Tensor) -> tuple[Tensor, ...]:
    tokens = tuple(range(lse_squared.ndim))
    rows = lse_squared.new_tensor(float(lse_squared.numel() * n_layers))  # (token, layer) pairs
    return (assignments.sum(tokens), probs.sum(tokens), lse_squared.sum(), dropped.sum(), rows)


def aux_losses(layout: Optional[ops.Layout], statistics: dict[str, Tensor], *, n_experts: int, top_k: int,
               n_layers: int, token_axes: ops.Axes = ops.STREAM[:-1]) -> dict[str, Tensor]:
    """``moe_aux_loss``, ``router_z_loss`` and ``moe_dropped_fraction`` from the per-token statistics
    summed over ``n_layers`` layers (:func:`token_statistics`), over every token of the batch: under
    a layout the sums add every rank's tokens."""
    axes = [(*token_axes, "router"), (*token_axes, "router"), token_axes, token_axes]
    args = [ops.activation(statistics[name], a) for name, a in zip(STATISTICS, axes)]
    sums = ops.local(layout, functools.partial(_sums, n_layers), args, [("router",), ("router",), (), (), ()],
                     name="moe router statistics")
    tokens_per_expert, probs, lse_squared, dropped, rows = sums
    losses = losses_from_statistics(tokens_per_expert, probs, lse_squared, rows, n_experts=n_experts)
    return {**losses, "moe_dropped_fraction": dropped / (rows.clamp(min=1.0) * top_k)}


def losses_from_statistics(tokens_per_expert: Tensor, probs: Tensor, lse_squared: Tensor, rows: Tensor, *,
                           n_experts: int) -> dict[str, Tensor]:
    """``moe_aux_loss`` (load balancing) and ``router_z_loss`` from sums over (token, layer) pairs."""
    rows = rows.clamp(min=1.0)
    return {"moe_aux_loss": n_experts * torch.sum((tokens_per_expert / rows) * (probs / rows)),
            "router_z_loss": lse_squared / rows}


def load_balancing_loss(
    router_logits: Sequence[Tensor], n_experts: int, top_k: int
) -> Float[Tensor, ""]:
    """Over the router logits of every layer, concatenated along tokens (the module docstring)."""
    layer = MoE(embed_dim=1, mlp_dim=1, n_experts=n_experts, top_k=top_k)
    stats = [token_statistics(layer, r) for r in router_logits]
    rows = torch.tensor(float(sum(r.shape[0] for r in router_logits)))
    sums = [sum(s[name].sum(0) for s in stats) for name in STATISTICS[:3]]
    return losses_from_statistics(*sums, rows, n_experts=n_experts)["moe_aux_loss"]


def router_z_loss(router_logits: Sequence[Tensor]) -> Float[Tensor, ""]:
    logits = torch.cat([r.float() for r in router_logits], dim=0)
    return torch.logsumexp(logits, dim=-1).square().mean()
