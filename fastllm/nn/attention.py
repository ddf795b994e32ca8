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
from fastllm.nn import ops
from fastllm.nn.param import Param, normal, zeros

__all__ = ["Attention", "KVCache", "params", "apply", "dot_product_attention", "mask", "Q_AXES", "KV_AXES"]

Q_AXES: ops.Axes = ("batch", "seq", "heads", "head_dim")  # queries, and the attention's output
KV_AXES: ops.Axes = ("batch", "seq", "kv_heads", "head_dim")
ROPE_AXES: ops.Axes = ("batch", "seq", "rotary")  # cos and sin of the rotary angles (inputs)
# The weights' logical dims, declared once: params() uses them, and so do the operations in apply().
AXES: dict[str, ops.Axes] = {
    "wq": ("heads", "head_dim", "embed"), "wk": ("kv_heads", "head_dim", "embed"),
    "wv": ("kv_heads", "head_dim", "embed"), "wo": ("embed", "heads", "head_dim"),
    "bq": ("heads", "head_dim"), "bk": ("kv_heads", "head_dim"), "bv": ("kv_heads", "head_dim"), "bo": ("embed",),
}


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
    kernels: KernelConfig = KernelConfig()  # which implementation runs rotary and attention; matmul precision

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
        "wq": Param((h, d, e), AXES["wq"], normal(layer.std)),
        "wk": Param((kv, d, e), AXES["wk"], normal(layer.std)),
        "wv": Param((kv, d, e), AXES["wv"], normal(layer.std)),
        "wo": Param((e, h, d), AXES["wo"], normal(out_std)),
    }
    if layer.qkv_bias:
        spec["bq"] = Param((h, d), AXES["bq"], zeros())
        spec["bk"] = Param((kv, d), AXES["bk"], zeros())
        spec["bv"] = Param((kv, d), AXES["bv"], zeros())
    if layer.out_bias:
        spec["bo"] = Param((e,), AXES["bo"], zeros())
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


def _kv_of_local_heads(shards: ops.Shards, k: Tensor, v: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """The key/value heads this rank's query heads read, when the query heads are split and the
    key/value heads are not (fewer kv heads than ranks: each rank keeps them all)."""
    if shards.count("heads") == 1 or shards.count("kv_heads") != 1:
        return k, v
    group = heads * shards.count("heads") // k.shape[1]  # query heads per kv head, globally
    first = shards.index("heads") * heads
    lo, hi = first // group, (first + heads - 1) // group + 1
    return k[:, lo:hi], v[:, lo:hi]


def _core(layer: Attention, rotary: bool, segments: bool):
    """The attention of projected q, k, v (``[batch, seq, heads, head_dim]``) as a local function."""

    def attend(shards: ops.Shards, q: Tensor, k: Tensor, v: Tensor, *inputs: Tensor) -> Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, head_dim]
        k, v = _kv_of_local_heads(shards, k, v, q.shape[1])
        if rotary:
            q, k = apply_rotary(q, k, inputs[0], inputs[1], impl=select(layer.kernels, "rotary", q.device))
        segment_ids = inputs[-1] if segments else None
        out = dot_product_attention(q, k, v, window=layer.window, segment_ids=segment_ids, kernels=layer.kernels)
        return out.transpose(1, 2)  # [batch, seq, heads, head_dim]

    return attend


def apply(
    layer: Attention,
    p: dict,
    x: Float[Tensor, "batch seq_shard embed"],
    *,
    rope: Optional[tuple[Tensor, Tensor]] = None,
    segment_ids: Optional[Int[Tensor, "batch seq"]] = None,
    layout: Optional[ops.Layout] = None,
    cache: Optional[KVCache] = None,
) -> Union[Float[Tensor, "batch seq_shard embed"], tuple[Float[Tensor, "batch seq_shard embed"], KVCache]]:
    """Self-attention of the residual stream ``x``; ``rope`` is the (cos, sin) pair of
    :func:`rotary.cos_sin` (inputs: whole sequences). ``layout``: see :mod:`fastllm.nn.ops` (the
    attention needs every key of a sequence: ``seq`` stays whole inside it).
    ``cache``: ``x`` continues the cached tokens (``rope`` at their positions); returns
    ``(output, cache extended by x's keys and values)``.
    """
    q, k, v = ops.projections(layout, x, ops.STREAM, [(p[w], AXES[w], p.get(b)) for w, b in
                                                      (("wq", "bq"), ("wk", "bk"), ("wv", "bv"))],
                              matmul=layer.kernels.matmul)
    if cache is not None:
        if layout is not None:
            raise ValueError("decoding with a KV cache runs on one device (layout=None)")
        out, cache = _decode(layer, q, k, v, rope, segment_ids, cache)
    else:
        args = [ops.activation(q, Q_AXES), ops.activation(k, KV_AXES), ops.activation(v, KV_AXES)]
        args += [ops.data(t, ROPE_AXES) for t in rope or ()]
        args += [ops.data(segment_ids, ("batch", "seq"))] if segment_ids is not None else []
        core = _core(layer, rope is not None, segment_ids is not None)
        out = ops.local(layout, core, args, [Q_AXES], whole=("seq",), name="attention")[0]
    out = ops.dense(layout, out, Q_AXES, p["wo"], AXES["wo"], p.get("bo"), matmul=layer.kernels.matmul)
    return out if cache is None else (out, cache)


def _decode(layer: Attention, q: Tensor, k: Tensor, v: Tensor, rope, segment_ids, cache: KVCache):
    if segment_ids is not None:
        raise ValueError("attention with a KV cache takes no segment_ids (one sequence per row)")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, head_dim]
    if rope is not None:
        q, k = apply_rotary(q, k, *rope, impl=select(layer.kernels, "rotary", q.device))
    cache = KVCache(torch.cat([cache.keys, k], dim=2), torch.cat([cache.values, v], dim=2))
    out = _attend_to_cache(q, cache, layer.window)
    return out.transpose(1, 2), cache


def _attend_to_cache(q: Tensor, cache: KVCache, window: Optional[int]) -> Tensor:
    """The queries are the last ``q.shape[2]`` positions of the cached sequence."""
    allowed = mask(cache.length, window=window, device=q.device, queries=q.shape[2])
    return F.scaled_dot_product_attention(q, cache.keys, cache.values, attn_mask=allowed, enable_gqa=True)
