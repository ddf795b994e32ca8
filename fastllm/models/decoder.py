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
import functools
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from fastllm import nn, random
from fastllm.models.config import ModelConfig
from fastllm.nn import ops
from fastllm.nn.attention import KVCache
from fastllm.nn.ops import Layout

__all__ = [
    "param_specs",
    "init",
    "logical_axes",
    "model",
    "apply",
    "forward",
    "hidden_states",
    "lm_head",
    "loss",
    "init_cache",
    "block_layer",
    "rotary_layer",
    "layer_window",
    "HEAD_AXES",
]

HEAD_AXES: ops.Axes = ("vocab", "embed")  # the LM head, and the token table it may be tied to
POSITION_AXES: ops.Axes = ("positions", "embed")

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
            capacity_factor=config.moe.capacity_factor, kernels=config.kernels,
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
    embed = {"tokens": nn.embedding.params(config.vocab_size, config.embed_dim, axes=HEAD_AXES, std=std)}
    if config.positions == "learned":
        embed["positions"] = nn.embedding.params(
            config.max_seq_len, config.embed_dim, axes=POSITION_AXES, std=std
        )
    specs = {
        "embed": embed,
        "layers": [nn.block.params(block_layer(config, i)) for i in range(config.n_layers)],
        "final_norm": nn.norm.params(config.embed_dim, kind=config.norm),
    }
    if not config.tie_embeddings:
        specs["lm_head"] = nn.linear.params(config.embed_dim, config.vocab_size, axes=HEAD_AXES, std=std)
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


# --- the model's pieces, each once: the parts below and `forward` both call them ------------------
def _positions(tokens: Tensor, positions: Optional[Tensor], start: int = 0) -> Tensor:
    return nn.rotary.positions_of(tokens, start) if positions is None else positions


def _embed(config: ModelConfig, embed: dict, tokens: Tensor, positions: Tensor,
           layout: Optional[Layout]) -> Float[Tensor, "batch seq embed"]:
    h = nn.embedding.apply(embed["tokens"], tokens, axes=HEAD_AXES, layout=layout)
    if config.positions == "learned":
        h = h + nn.embedding.apply(embed["positions"], positions, axes=POSITION_AXES, layout=layout)
    return h


def _rope(config: ModelConfig, positions: Tensor, dtype: torch.dtype) -> Optional[tuple[Tensor, Tensor]]:
    rot = rotary_layer(config)
    return None if rot is None else nn.rotary.cos_sin(rot, positions, dtype=dtype)


def _head(config: ModelConfig, params: dict) -> Tensor:
    """The ``[vocab, embed]`` output matrix: the token embeddings when tied."""
    return params["embed"]["tokens"] if config.tie_embeddings else params["lm_head"]["w"]


# --- the parts ------------------------------------------------------------------------------------
def _moe_statistics(config: ModelConfig, h: Tensor) -> dict[str, Tensor]:
    """Per-token router statistics, summed over the layers as they run (zeros before the first):
    token-shaped like the stream, so they are laid out as it is."""
    tokens = h.shape[:-1]
    per_expert = h.new_zeros((*tokens, config.moe.n_experts), dtype=torch.float32)
    per_token = h.new_zeros(tokens, dtype=torch.float32)
    return dict(zip(nn.moe.STATISTICS, (per_expert, per_expert, per_token, per_token)))


def _embed_part(config: ModelConfig, params: tuple, carry: dict, batch: dict, layout) -> dict:
    tokens = batch["tokens"]
    positions = _positions(tokens, batch.get("positions"))
    h = _embed(config, params[0], tokens, positions, layout)
    carry = {"h": h}
    rope = _rope(config, positions, h.dtype)
    if rope is not None:
        carry["cos"], carry["sin"] = rope
    if config.moe is not None:
        carry.update(_moe_statistics(config, h))
    return carry


def _add_statistics(block: nn.Block, carry: dict, router_logits: Optional[Tensor]) -> dict:
    if router_logits is None:
        return carry
    stats = nn.moe.token_statistics(block.ffn, router_logits)
    return {**carry, **{name: carry[name] + value for name, value in stats.items()}}


def _block_part(block: nn.Block, params: tuple, carry: dict, batch: dict, layout) -> dict:
    rope = (carry["cos"], carry["sin"]) if "cos" in carry else None
    h, router_logits = nn.block.apply(block, params[0], carry["h"], rope=rope,
                                      segment_ids=batch.get("segment_ids"), layout=layout)
    return _add_statistics(block, {**carry, "h": h}, router_logits)


def _head_part(config: ModelConfig, params: tuple, carry: dict, batch: dict, layout) -> dict:
    norm, head = params
    h = nn.norm.apply(norm, carry["h"], eps=config.norm_eps, kernels=config.kernels)
    # the LM head and the loss together: the fused kernel never materialises the logits
    ce, valid = ops.linear_cross_entropy(layout, h, ops.STREAM, head, HEAD_AXES, batch["targets"],
                                         batch.get("loss_mask"), impl=config.kernels.cross_entropy)
    aux = _aux_losses(config, carry, h, layout)
    total = ce
    if config.moe is not None:
        total = total + config.moe.aux_loss_coef * aux["moe_aux_loss"] + config.moe.z_loss_coef * aux["router_z_loss"]
    return {"loss": total, "cross_entropy": ce, "valid_tokens": valid, **aux}


def _aux_losses(config: ModelConfig, carry: dict, h: Tensor, layout: Optional[Layout]) -> dict[str, Tensor]:
    """The MoE auxiliary losses over every token of the (global) batch; zeros for a dense model."""
    if config.moe is None:
        zero = torch.zeros((), device=h.device, dtype=torch.float32)
        return {"moe_aux_loss": zero, "router_z_loss": zero}
    m = config.moe
    aux = nn.moe.aux_losses(layout, {name: carry[name] for name in nn.moe.STATISTICS}, n_experts=m.n_experts,
                            top_k=m.top_k, n_layers=config.n_layers)
    return aux if m.capacity_factor is not None else {k: v for k, v in aux.items() if k != "moe_dropped_fraction"}


@functools.lru_cache(maxsize=64)
def model(config: ModelConfig) -> nn.Model:
    """The decoder as an :class:`fastllm.nn.Model`: the embedding, one part per block along
    ``layers``, and the head (final norm, LM head and loss)."""
    from fastllm.models.counting import flops_per_token

    head_params = ("embed", "tokens") if config.tie_embeddings else ("lm_head", "w")
    parts = [nn.Part("embed", [("embed",)], _embed_part, static=config)]
    parts += [nn.Part(f"layers.{i}", [("layers", i)], _block_part, static=block_layer(config, i), layer=i)
              for i in range(config.n_layers)]
    parts.append(nn.Part("head", [("final_norm",), head_params], _head_part, static=config))
    return nn.Model(param_specs(config), tuple(parts), flops_per_token=functools.partial(flops_per_token, config),
                    config=config)


# --- whole-model functions --------------------------------------------------------------------
def forward(
    config: ModelConfig,
    params: dict,
    tokens: Int[Tensor, "batch seq"],
    *,
    positions: Optional[Int[Tensor, "batch seq"]] = None,
    segment_ids: Optional[Int[Tensor, "batch seq"]] = None,
    layout: Optional[Layout] = None,
    cache: Optional[list[KVCache]] = None,
) -> Union[
    tuple[Float[Tensor, "batch seq vocab"], dict[str, Tensor]],
    tuple[Float[Tensor, "batch seq vocab"], dict[str, Tensor], list[KVCache]],
]:
    """(logits in the params' dtype, aux) with aux ``moe_aux_loss`` and ``router_z_loss``.

    ``layout`` (a parallel layout from ``fastllm.sharding``; ``None``: one device): ``params`` are
    this rank's shards and the logits this rank's block of the vocabulary. ``cache`` (decoding, from
    :func:`init_cache`): ``tokens`` continue the cached ones; also returns the extended cache.
    """
    out = hidden_states(config, params, tokens, positions=positions, segment_ids=segment_ids, layout=layout,
                        cache=cache)
    logits = ops.dense(layout, out[0], ops.STREAM, _head(config, params), HEAD_AXES)  # [batch, seq, vocab]
    return (logits, *out[1:])


def lm_head(config: ModelConfig, params: dict) -> Tensor:
    """The ``[vocab, embed]`` output matrix (the token embeddings when tied)."""
    return _head(config, params)


def hidden_states(
    config: ModelConfig,
    params: dict,
    tokens: Int[Tensor, "batch seq"],
    *,
    positions: Optional[Int[Tensor, "batch seq"]] = None,
    segment_ids: Optional[Int[Tensor, "batch seq"]] = None,
    layout: Optional[Layout] = None,
    cache: Optional[list[KVCache]] = None,
) -> Union[
    tuple[Float[Tensor, "batch seq embed"], dict[str, Tensor]],
    tuple[Float[Tensor, "batch seq embed"], dict[str, Tensor], list[KVCache]],
]:
    """(the final-normed residual stream, aux): :func:`forward` before the LM head. ``cache``: see
    :func:`forward`."""
    positions = _positions(tokens, positions, 0 if not cache else cache[0].length)
    h = _embed(config, params["embed"], tokens, positions, layout)  # [batch, seq, embed]
    rope = _rope(config, positions, h.dtype)
    carry, new_cache = ({} if config.moe is None else _moe_statistics(config, h)), []
    for index, layer_params in enumerate(params["layers"]):
        block = block_layer(config, index)
        out = nn.block.apply(block, layer_params, h, rope=rope, segment_ids=segment_ids, layout=layout,
                             cache=None if cache is None else cache[index])
        h, router_logits, *extended = out
        new_cache += extended
        carry = _add_statistics(block, carry, router_logits)
    h = nn.norm.apply(params["final_norm"], h, eps=config.norm_eps, kernels=config.kernels)
    aux = _aux_losses(config, carry, h, layout)
    return (h, aux) if cache is None else (h, aux, new_cache)


def init_cache(
    config: ModelConfig, batch: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> list[KVCache]:
    """An empty KV cache for :func:`forward`: per layer, keys and values ``[batch, kv_heads, 0, head_dim]``."""
    empty = torch.zeros((batch, config.n_kv_heads, 0, config.head_dim), dtype=dtype, device=device)
    return [KVCache(empty, empty) for _ in range(config.n_layers)]


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
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean cross-entropy over valid targets plus the weighted MoE auxiliary losses.

    ``batch``: ``tokens`` and ``targets`` ``[batch, seq]`` int64 (-100 ignored), optional
    ``positions``, ``segment_ids`` and ``loss_mask``. Metrics are detached scalars. This is
    :func:`fastllm.nn.run` of :func:`model` (the train step runs the same parts).
    """
    for name in ("tokens", "targets"):
        if name not in batch:
            raise KeyError(f"loss: batch has no {name!r} (keys: {sorted(batch)})")
    carry = nn.run(model(config), params, batch, layout=layout)
    return carry["loss"], {name: value.detach() for name, value in carry.items()}
