"""Causal self-attention (Vaswani et al. 2017) with grouped-query heads (Ainslie et al. 2023).

``n_kv_heads == n_heads`` is multi-head, ``1`` multi-query (Shazeer 2019), anything between is
grouped-query: query head ``h`` reads key/value head ``h // (n_heads / n_kv_heads)``. Weights are
3-D (``wq: [heads, head_dim, embed]``, ``wo: [embed, heads, head_dim]``) so sharding splits whole
heads. The score is ``softmax(q k^T / sqrt(head_dim) + mask) v`` where key ``j`` is visible from
query ``i`` iff ``j <= i``, ``i - j < window`` (sliding window, Mistral; the query itself counts)
and both tokens share a segment id (packed documents). Everything the mask decides lives in
:func:`dot_product_attention`, the one function a fused kernel replaces: it runs
:func:`fastllm.kernels.attention.attention` with the implementation the layer's ``kernels.attention``
resolves to (flash SDPA, or FlexAttention for windows and segments; else the torch reference, which
with :func:`mask` is defined there once), and ``kernels.rotary`` picks the fused rotary kernel
(:func:`fastllm.kernels.rotary.apply_rotary`, q and k in one pass) or its reference, :func:`rotary.apply`.

Decoding with a key/value cache (:class:`KVCache`): the new tokens' keys and values (rotary
applied) are appended to the cached ones and the new queries, the last positions of the sequence,
attend to all of them under the same mask, so each generated token costs O(seq) instead of O(seq^2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from fastllm.kernels import KernelConfig, select
from fastllm.kernels.attention import attention as kernel_attention
from fastllm.kernels.attention import visible as mask
from fastllm.kernels.rotary import apply_rotary
from fastllm.nn import layout as _layout
from fastllm.nn.param import Param, normal, zeros

__all__ = ["Attention", "KVCache", "params", "apply", "dot_product_attention", "mask"]


class KVCache(NamedTuple):
    """The keys and values of the tokens seen so far, ``[batch, kv_heads, cached, head_dim]``."""

    keys: Tensor
    values: Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[2]


@dataclass(frozen=True)
class Attention:
    """Shapes and options of one attention layer. ``out_std`` (default ``std``) inits ``wo``."""

    embed_dim: int
    n_heads: int
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    qkv_bias: bool = False
    out_bias: bool = False
    window: Optional[int] = None
    std: float = 0.02
    out_std: Optional[float] = None
    kernels: KernelConfig = KernelConfig()  # which implementation runs rotary and attention

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.embed_dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")


def params(layer: Attention) -> dict:
    h, kv, d, e = layer.n_heads, layer.n_kv_heads, layer.head_dim, layer.embed_dim
    out_std = layer.std if layer.out_std is None else layer.out_std
    spec = {
        "wq": Param((h, d, e), ("heads", "head_dim", "embed"), normal(layer.std)),
        "wk": Param((kv, d, e), ("kv_heads", "head_dim", "embed"), normal(layer.std)),
        "wv": Param((kv, d, e), ("kv_heads", "head_dim", "embed"), normal(layer.std)),
        "wo": Param((e, h, d), ("embed", "heads", "head_dim"), normal(out_std)),
    }
    if layer.qkv_bias:
        spec["bq"] = Param((h, d), ("heads", "head_dim"), zeros())
        spec["bk"] = Param((kv, d), ("kv_heads", "head_dim"), zeros())
        spec["bv"] = Param((kv, d), ("kv_heads", "head_dim"), zeros())
    if layer.out_bias:
        spec["bo"] = Param((e,), ("embed",), zeros())
    return spec


def dot_product_attention(
    q: Float[Tensor, "batch heads seq head_dim"],
    k: Float[Tensor, "batch kv_heads seq head_dim"],
    v: Float[Tensor, "batch kv_heads seq head_dim"],
    *,
    window: Optional[int] = None,
    segment_ids: Optional[Int[Tensor, "batch seq"]] = None,
    kernels: Optional[KernelConfig] = None,
) -> Float[Tensor, "batch heads seq head_dim"]:
    """The torch reference repeats k/v per group and, for windows or segments, builds the boolean
    :func:`mask`; the fused path needs neither (see docs/performance.md, "Attention: what each mask
    runs on")."""
    impl = select(kernels, "attention", q.device)
    return kernel_attention(q, k, v, window=window, segment_ids=segment_ids, impl=impl)


def _project_in(
    x: Tensor, w: Tensor, b: Optional[Tensor]
) -> Tensor:  # [batch, seq, embed] -> [batch, heads, seq, head_dim]
    heads, head_dim, embed = w.shape
    bias = None if b is None else b.reshape(heads * head_dim)
    y = F.linear(x, w.reshape(heads * head_dim, embed), bias)
    return y.unflatten(-1, (heads, head_dim)).transpose(1, 2)


def apply(
    layer: Attention,
    p: dict,
    x: Float[Tensor, "batch local_seq embed"],
    *,
    rope: Optional[tuple[Tensor, Tensor]] = None,
    segment_ids: Optional[Int[Tensor, "batch seq"]] = None,
    layout: Optional[_layout.Layout] = None,
    cache: Optional[KVCache] = None,
) -> Union[Float[Tensor, "batch local_seq embed"], tuple[Float[Tensor, "batch local_seq embed"], KVCache]]:
    """Self-attention of ``x``; ``rope`` is the (cos, sin) pair of :func:`rotary.cos_sin`.

    ``layout`` (see :mod:`fastllm.nn.layout`): the head counts come from the (local) weights;
    ``x`` may be a block of the sequence (``local_seq``) that the layout gathers.
    ``cache``: ``x`` continues the cached tokens (``rope`` at their positions); returns
    ``(output, cache extended by x's keys and values)``.
    """
    x = _layout.enter_parallel(layout, x)  # [batch, seq, embed]: every token, this rank's heads
    q = _project_in(x, p["wq"], p.get("bq"))  # [batch, heads, seq, head_dim]
    k = _project_in(x, p["wk"], p.get("bk"))  # [batch, kv_heads, seq, head_dim]
    v = _project_in(x, p["wv"], p.get("bv"))
    if rope is not None:
        q, k = apply_rotary(q, k, *rope, impl=select(layer.kernels, "rotary", q.device))
    if cache is None:
        out = dot_product_attention(q, k, v, window=layer.window, segment_ids=segment_ids, kernels=layer.kernels)
    else:
        if segment_ids is not None:
            raise ValueError("attention with a KV cache takes no segment_ids (one sequence per row)")
        cache = KVCache(torch.cat([cache.keys, k], dim=2), torch.cat([cache.values, v], dim=2))
        out = _attend_to_cache(q, cache, layer.window)
    out = out.transpose(1, 2).flatten(2)  # [batch, seq, heads * head_dim]
    wo = p["wo"]
    out = _layout.row_parallel_linear(layout, out, wo.reshape(wo.shape[0], -1), p.get("bo"))
    return out if cache is None else (out, cache)


def _attend_to_cache(q: Tensor, cache: KVCache, window: Optional[int]) -> Tensor:
    """The queries are the last ``q.shape[2]`` positions of the cached sequence."""
    allowed = mask(cache.length, window=window, device=q.device, queries=q.shape[2])
    return F.scaled_dot_product_attention(q, cache.keys, cache.values, attn_mask=allowed, enable_gqa=True)
