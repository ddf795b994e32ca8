"""The configurable decoder-only transformer: GPT-2, StarCoder, Llama, Mistral, Mixtral, Qwen2.

    h = embed.tokens[tokens] (+ embed.positions[positions])
    for each layer: h = block(h)          # pre-norm attention + MLP (or MoE), fastllm.nn.block
    logits = final_norm(h) @ lm_head.w^T  # embed.tokens when the embeddings are tied

A model is a pure function of ``(config, params, tokens)``; ``params`` is the tree described in
docs/models.md. Initialisation (one table, :func:`param_specs`): every matrix ``N(0, init_std)``,
norm scales one, biases zero; GPT-2 and StarCoder also scale the residual output projections
(``wo``, ``w_down``) by ``1/sqrt(2 n_layers)`` (Radford et al. 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fastllm import nn, random
from fastllm.models.config import ModelConfig
from fastllm.nn import layout as L
from fastllm.nn.attention import KVCache
from fastllm.nn.layout import Layout

__all__ = [
    "param_specs",
    "init",
    "logical_axes",
    "apply",
    "forward",
    "hidden_states",
    "lm_head",
    "loss",
    "init_cache",
    "block_layer",
    "rotary_layer",
    "layer_window",
]

_SCALED_RESIDUAL_FAMILIES = ("gpt2", "starcoder")


def _out_std(config: ModelConfig) -> float:
    if config.family in _SCALED_RESIDUAL_FAMILIES:
        return config.init_std / math.sqrt(2 * config.n_layers)
    return config.init_std


def layer_window(config: ModelConfig, index: int) -> Optional[int]:
    """The sliding window of layer ``index`` (``None``: full causal attention)."""
    if config.sliding_window is None:
        return None
    if config.sliding_window_layers is not None and index < config.sliding_window_layers:
        return None
    return config.sliding_window


def rotary_layer(config: ModelConfig) -> Optional[nn.Rotary]:
    if config.positions != "rotary":
        return None
    r = config.rope
    return nn.Rotary(
        head_dim=config.head_dim, theta=r.theta, scaling=r.scaling, factor=r.factor,
        low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
        original_max_positions=r.original_max_positions, fraction=r.fraction,
    )


def block_layer(config: ModelConfig, index: int) -> nn.Block:
    """The :class:`fastllm.nn.Block` of layer ``index``."""
    attention = nn.Attention(
        embed_dim=config.embed_dim, n_heads=config.n_heads, n_kv_heads=config.n_kv_heads,
        head_dim=config.head_dim, qkv_bias=config.qkv_bias, out_bias=config.attention_out_bias,
        window=layer_window(config, index), std=config.init_std, out_std=_out_std(config),
        kernels=config.kernels,
    )
    if config.moe is not None:
        ffn = nn.MoE(
            embed_dim=config.embed_dim, mlp_dim=config.mlp_dim, n_experts=config.moe.n_experts,
            top_k=config.moe.top_k, normalize_top_k=config.moe.normalize_top_k,
            activation=config.activation, std=config.init_std, out_std=_out_std(config),
            kernels=config.kernels,
        )
    else:
        ffn = nn.MLP(
            embed_dim=config.embed_dim, mlp_dim=config.mlp_dim, activation=config.activation,
            gated=config.gated_mlp, bias=config.mlp_bias, std=config.init_std,
            out_std=_out_std(config), kernels=config.kernels,
        )
    return nn.Block(attention=attention, ffn=ffn, norm=config.norm, norm_eps=config.norm_eps,
                    kernels=config.kernels)


def param_specs(config: ModelConfig) -> dict:
    """The tree of :class:`fastllm.nn.Param`: shapes, logical axes and initializers."""
    std = config.init_std
    embed = {"tokens": nn.embedding.params(config.vocab_size, config.embed_dim, std=std)}
    if config.positions == "learned":
        embed["positions"] = nn.embedding.params(
            config.max_seq_len, config.embed_dim, axes=("positions", "embed"), std=std
        )
    specs = {
        "embed": embed,
        "layers": [nn.block.params(block_layer(config, i)) for i in range(config.n_layers)],
        "final_norm": nn.norm.params(config.embed_dim, kind=config.norm),
    }
    if not config.tie_embeddings:
        specs["lm_head"] = nn.linear.params(
            config.embed_dim, config.vocab_size, axes=("vocab", "embed"), std=std
        )
    return specs


def init(
    config: ModelConfig,
    key: random.Key,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict:
    """Parameters drawn from ``fold_in(key, path)``; ``device="meta"`` allocates nothing."""
    return nn.init(param_specs(config), key, dtype=dtype, device=device)


def logical_axes(config: ModelConfig) -> dict:
    """The params tree with a tuple of logical dimension names at each leaf."""
    return nn.axes(param_specs(config))


def _embed(
    config: ModelConfig, params: dict, tokens: Tensor, positions: Tensor, layout: Optional[Layout]
) -> Float[Tensor, "batch seq embed"]:
    embed = L.params(layout, "embed", params["embed"])
    h = L.embed(layout, embed["tokens"], tokens)
    if config.positions == "learned":
        h = h + nn.embedding.apply(embed["positions"], L.local_seq(layout, positions))
    return h


def forward(
    config: ModelConfig,
    params: dict,
    tokens: Int[Tensor, "batch seq"],
    *,
    positions: Optional[Int[Tensor, "batch seq"]] = None,
    segment_ids: Optional[Int[Tensor, "batch seq"]] = None,
    layout: Optional[Layout] = None,
    remat: bool = False,
    cache: Optional[list[KVCache]] = None,
    block_fn: Optional[Callable[..., tuple]] = None,
) -> Union[
    tuple[Float[Tensor, "batch seq vocab"], dict[str, Tensor]],
    tuple[Float[Tensor, "batch seq vocab"], dict[str, Tensor], list[KVCache]],
]:
    """(logits in the params' dtype, aux) with aux ``moe_aux_loss`` and ``router_z_loss``.

    ``layout`` (a parallel layout from ``fastllm.sharding``; ``None``: one device): ``params`` are
    this rank's shards and the logits this rank's block of the vocabulary. ``remat``: recompute
    each block's activations in backward (see :func:`hidden_states`). ``cache`` (decoding, from
    :func:`init_cache`): ``tokens`` continue the cached ones; also returns the extended cache.
    ``block_fn``: runs each block in place of :func:`fastllm.nn.block.apply` (see :func:`hidden_states`).
    """
    out = hidden_states(config, params, tokens, positions=positions, segment_ids=segment_ids, layout=layout,
                        remat=remat, cache=cache, block_fn=block_fn)
    logits = nn.linear.linear(L.enter_parallel(layout, out[0]), lm_head(config, params, layout))  # [batch, seq, vocab]
    return (logits, *out[1:])


def lm_head(config: ModelConfig, params: dict, layout: Optional[Layout] = None) -> Tensor:
    """The ``[vocab, embed]`` output matrix (the token embeddings when tied; a vocab block under a layout)."""
    if config.tie_embeddings:
        return L.params(layout, "embed", params["embed"])["tokens"]
    return L.params(layout, "lm_head", params["lm_head"])["w"]


def hidden_states(
    config: ModelConfig,
    params: dict,
    tokens: Int[Tensor, "batch seq"],
    *,
    positions: Optional[Int[Tensor, "batch seq"]] = None,
    segment_ids: Optional[Int[Tensor, "batch seq"]] = None,
    layout: Optional[Layout] = None,
    remat: bool = False,
    cache: Optional[list[KVCache]] = None,
    block_fn: Optional[Callable[..., tuple]] = None,
) -> Union[
    tuple[Float[Tensor, "batch local_seq embed"], dict[str, Tensor]],
    tuple[Float[Tensor, "batch local_seq embed"], dict[str, Tensor], list[KVCache]],
]:
    """(the final-normed residual stream, aux): :func:`forward` before the LM head.

    ``remat`` runs each block under ``torch.utils.checkpoint`` (Chen et al. 2016): its inner
    activations are dropped after the forward pass and recomputed in backward, so a block keeps
    only its input alive; same values, less memory, one more forward. A ZeRO-3 layout gathers the
    block's parameters inside the recomputed region, so the gathered copies are freed too and
    gathered again in backward. ``cache``: see :func:`forward`.

    ``block_fn`` (default :func:`fastllm.nn.block.apply`, same signature) computes a block from its
    gathered params, e.g. a compiled one (:class:`fastllm.train.compile.CompiledBlocks`); the
    ``params`` hook and ``remat``'s checkpoint stay around it, in eager mode.
    """
    if remat and cache is not None:
        raise ValueError("remat is for training; decoding with a KV cache keeps no activations to drop")
    if positions is None:
        start = 0 if not cache else cache[0].length
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand(tokens.shape)
    h = _embed(config, params, tokens, positions, layout)  # [batch, seq, embed]
    rot = rotary_layer(config)
    rope = None if rot is None else nn.rotary.cos_sin(rot, positions, dtype=h.dtype)
    run = _block if not remat else lambda *args: checkpoint(_block, *args, use_reentrant=False)
    block_fn = nn.block.apply if block_fn is None else block_fn
    router_logits, new_cache = [], []
    for index, layer_params in enumerate(params["layers"]):
        layer_cache = None if cache is None else cache[index]
        h, logits_of_router, *extended = run(block_fn, config, index, layer_params, h, rope, segment_ids, layout,
                                             layer_cache)
        new_cache += extended
        if logits_of_router is not None:
            router_logits.append(logits_of_router)
    h = nn.norm.apply(L.params(layout, "final_norm", params["final_norm"]), h, eps=config.norm_eps,
                      kernels=config.kernels)
    aux = _aux_losses(config, router_logits, h)
    return (h, aux) if cache is None else (h, aux, new_cache)


def _block(block_fn, config, index, layer_params, h, rope, segment_ids, layout, cache):
    """Block ``index``; a ZeRO-3 layout gathers its params here (inside the region remat recomputes)."""
    p = L.params(layout, f"layers.{index}", layer_params)
    return block_fn(block_layer(config, index), p, h, rope=rope, segment_ids=segment_ids, layout=layout, cache=cache)


def init_cache(
    config: ModelConfig, batch: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> list[KVCache]:
    """An empty KV cache for :func:`forward`: per layer, keys and values ``[batch, kv_heads, 0, head_dim]``."""
    empty = torch.zeros((batch, config.n_kv_heads, 0, config.head_dim), dtype=dtype, device=device)
    return [KVCache(empty, empty) for _ in range(config.n_layers)]


def _aux_losses(config: ModelConfig, router_logits: list[Tensor], h: Tensor) -> dict[str, Tensor]:
    if not router_logits:
        zero = torch.zeros((), device=h.device, dtype=torch.float32)
        return {"moe_aux_loss": zero, "router_z_loss": zero}
    return {
        "moe_aux_loss": nn.moe.load_balancing_loss(router_logits, config.moe.n_experts, config.moe.top_k),
        "router_z_loss": nn.moe.router_z_loss(router_logits),
    }


def apply(
    config: ModelConfig,
    params: dict,
    tokens: Int[Tensor, "batch seq"],
    *,
    positions: Optional[Int[Tensor, "batch seq"]] = None,
    segment_ids: Optional[Int[Tensor, "batch seq"]] = None,
    layout: Optional[Layout] = None,
) -> Float[Tensor, "batch seq vocab"]:
    """Next-token logits ``[batch, seq, vocab]`` (this rank's vocab block under a ``layout``)."""
    return forward(config, params, tokens, positions=positions, segment_ids=segment_ids, layout=layout)[0]


def loss(
    config: ModelConfig,
    params: dict,
    batch: dict,
    *,
    layout: Optional[Layout] = None,
    remat: bool = False,
    block_fn: Optional[Callable[..., tuple]] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean cross-entropy over valid targets plus the weighted MoE auxiliary losses.

    ``batch``: ``tokens`` and ``targets`` ``[batch, seq]`` int64 (-100 ignored), optional
    ``positions``, ``segment_ids`` and ``loss_mask``. Metrics are detached scalars. ``remat``:
    recompute each block's activations in backward; ``block_fn``: see :func:`hidden_states`.
    """
    for name in ("tokens", "targets"):
        if name not in batch:
            raise KeyError(f"loss: batch has no {name!r} (keys: {sorted(batch)})")
    h, aux = hidden_states(
        config, params, batch["tokens"],
        positions=batch.get("positions"), segment_ids=batch.get("segment_ids"), layout=layout, remat=remat,
        block_fn=block_fn,
    )
    # the LM head and the loss together: the fused kernel never materialises the logits
    ce, valid = L.linear_cross_entropy(layout, h, lm_head(config, params, layout), batch["targets"],
                                       batch.get("loss_mask"), impl=config.kernels.cross_entropy)
    total = ce
    if config.moe is not None:
        total = total + config.moe.aux_loss_coef * aux["moe_aux_loss"]
        total = total + config.moe.z_loss_coef * aux["router_z_loss"]
    metrics = {"loss": total, "cross_entropy": ce, "valid_tokens": valid, **aux}
    return total, {name: value.detach() for name, value in metrics.items()}
