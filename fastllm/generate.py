"""Autoregressive sampling with a key/value cache.

The prompt runs once through the model, filling each layer's cache with its keys and values
(``[batch, kv_heads, seq, head_dim]``, rotary already applied); every new token then runs alone,
attending to the cached keys, so a step costs O(seq) instead of O(seq^2). The cached forward uses
the same layers as :func:`fastllm.models.forward` (norms, MLP/MoE, rotary, the block's window) and
is tested to give the same logits as the uncached model.

Sampling: greedy when ``temperature == 0``; otherwise softmax(logits / temperature) restricted to
the ``top_k`` most likely tokens and to the smallest set whose probability reaches ``top_p``
(nucleus sampling, Holtzman et al. 2020), drawn from ``fold_in(key, step)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from fastllm import nn, random
from fastllm.models.config import ModelConfig
from fastllm.models.decoder import block_layer, rotary_layer

__all__ = ["KVCache", "init_cache", "forward_cached", "sample_next", "generate"]

KVCache = list  # one (keys, values) pair per layer, each [batch, kv_heads, capacity, head_dim]


def init_cache(config: ModelConfig, batch: int, capacity: int, *, dtype=torch.float32, device="cpu") -> KVCache:
    shape = (batch, config.n_kv_heads, capacity, config.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.n_layers)]


def _heads(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:  # -> [batch, heads, seq, head_dim]
    heads, head_dim, embed = w.shape
    y = F.linear(x, w.reshape(heads * head_dim, embed), None if b is None else b.reshape(-1))
    return y.unflatten(-1, (heads, head_dim)).transpose(1, 2)


def _cached_attention(layer: nn.Attention, p: dict, x: Tensor, rope, cache: tuple, start: int) -> Tensor:
    q, k, v = _heads(x, p["wq"], p.get("bq")), _heads(x, p["wk"], p.get("bk")), _heads(x, p["wv"], p.get("bv"))
    if rope is not None:
        q, k = nn.rotary.apply(q, *rope), nn.rotary.apply(k, *rope)
    end = start + x.shape[1]
    cache[0][:, :, start:end] = k
    cache[1][:, :, start:end] = v
    keys, values = cache[0][:, :, :end], cache[1][:, :, :end]  # [batch, kv_heads, end, head_dim]
    groups = layer.n_heads // layer.n_kv_heads
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    i = torch.arange(start, end, device=x.device)[:, None]  # query positions
    j = torch.arange(end, device=x.device)[None, :]  # key positions
    allowed = j <= i
    if layer.window is not None:
        allowed = allowed & (i - j < layer.window)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
    out = out.transpose(1, 2).flatten(2)  # [batch, seq, heads * head_dim]
    return F.linear(out, p["wo"].reshape(p["wo"].shape[0], -1), p.get("bo"))


def forward_cached(
    config: ModelConfig, params: dict, tokens: Int[Tensor, "batch seq"], cache: KVCache, start: int
) -> Float[Tensor, "batch seq vocab"]:
    """Logits of ``tokens`` placed at positions ``start..``; writes their keys/values into ``cache``."""
    b, t = tokens.shape
    positions = torch.arange(start, start + t, device=tokens.device).expand(b, t)
    h = nn.embedding.apply(params["embed"]["tokens"], tokens)  # [batch, seq, embed]
    if config.positions == "learned":
        h = h + nn.embedding.apply(params["embed"]["positions"], positions)
    rot = rotary_layer(config)
    rope = None if rot is None else nn.rotary.cos_sin(rot, positions, dtype=h.dtype)
    for index, p in enumerate(params["layers"]):
        block = block_layer(config, index)
        a = nn.norm.apply(p["attention_norm"], h, eps=config.norm_eps)
        h = h + _cached_attention(block.attention, p["attention"], a, rope, cache[index], start)
        m = nn.norm.apply(p["mlp_norm"], h, eps=config.norm_eps)
        if block.ffn_name == "moe":
            h = h + nn.moe.apply(block.ffn, p["moe"], m)[0]
        else:
            h = h + nn.mlp.apply(block.ffn, p["mlp"], m)
    h = nn.norm.apply(params["final_norm"], h, eps=config.norm_eps)
    head = params["embed"]["tokens"] if config.tie_embeddings else params["lm_head"]["w"]
    return nn.linear.linear(h, head)


def sample_next(
    logits: Float[Tensor, "batch vocab"],
    key: Optional[random.Key],
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
) -> Int[Tensor, "batch"]:
    """One token per row: argmax at temperature 0, else a draw from the filtered distribution."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    if key is None:
        raise ValueError("sampling with temperature > 0 needs a random key")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before it already >= p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=random.generator(key)).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(
    config: ModelConfig,
    params: dict,
    prompt: Int[Tensor, "batch prompt"],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    key: Optional[random.Key] = None,
    eos_id: Optional[int] = None,
    use_cache: bool = True,
) -> Int[Tensor, "batch total"]:
    """``prompt`` followed by up to ``max_new_tokens`` sampled tokens (stops early when every row
    has produced ``eos_id``). ``use_cache=False`` re-runs the whole sequence each step (reference)."""
    from fastllm import models

    total = prompt.shape[1] + max_new_tokens
    if total > config.max_seq_len:
        raise ValueError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's max_seq_len={config.max_seq_len}")
    dtype = params["embed"]["tokens"].dtype
    cache = init_cache(config, prompt.shape[0], total, dtype=dtype, device=prompt.device) if use_cache else None
    tokens, done, start = prompt, torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device), 0
    for step in range(max_new_tokens):
        if use_cache:
            logits = forward_cached(config, params, tokens[:, start:], cache, start)
            start = tokens.shape[1]
        else:
            logits = models.apply(config, params, tokens)
        step_key = None if key is None else random.fold_in(key, step)
        next_token = sample_next(logits[:, -1], step_key, temperature=temperature, top_k=top_k, top_p=top_p)
        if eos_id is not None:
            next_token = torch.where(done, torch.full_like(next_token, eos_id), next_token)
            done = done | (next_token == eos_id)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if eos_id is not None and bool(done.all()):
            break
    return tokens
