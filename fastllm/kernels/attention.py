"""Causal attention on PyTorch's fused kernels: flash SDPA for plain causal, FlexAttention for masks.

Mask semantics (:func:`visible`, which ``fastllm.nn.attention`` calls ``mask``): key ``j`` is visible from query ``i`` iff
``j <= i``, ``i - j < window`` (Mistral's sliding window, the query itself counted) and both share a
segment id (packed documents). Where it runs (``impl`` resolved to "triton", i.e. fused):

* causal only: ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)``; on CUDA in
  bf16/fp16 PyTorch picks FlashAttention-2 (Dao 2023) and never builds a mask or repeats k/v;
* sliding window and/or segment ids: FlexAttention (``torch.compile``d on CUDA) with a block mask,
  so fully masked tiles are skipped and the ``[seq, seq]`` mask is never materialised.

The reference (``"torch"``, the model's unfused path) repeats k/v per query group and calls SDPA, with
the causal flag alone or with the boolean mask of :func:`visible` for windows and segments.
"""

import contextlib
import functools
import weakref
from collections.abc import Iterable, Iterator
from typing import Optional, no_type_check

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from fastllm.kernels.registry import Choice, resolve

__all__ = ["attention", "attention_reference", "visible", "prepared_block_masks"]


def visible(
    seq_len: int,
    *,
    window: Optional[int] = None,
    segment_ids: Optional[Int[Tensor, "batch seq"]] = None,
    device: torch.device | str = "cpu",
    queries: Optional[int] = None,
) -> Bool[Tensor, "#batch 1 queries seq"]:
    """``True`` where query ``i`` may attend to key ``j``: causal, in window, same segment.

    ``queries`` (default ``seq_len``): the rows of the last ``queries`` positions only (decoding).
    """
    queries = seq_len if queries is None else queries
    i = torch.arange(seq_len - queries, seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    allowed = allowed[None, None]  # [1, 1, queries, seq]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [batch, seq, seq]
        allowed = allowed & same[:, None]
    return allowed


def attention_reference(
    q: Float[Tensor, "batch heads seq head_dim"],
    k: Float[Tensor, "batch kv_heads seq head_dim"],
    v: Float[Tensor, "batch kv_heads seq head_dim"],
    *,
    window: Optional[int] = None,
    segment_ids: Optional[Int[Tensor, "batch seq"]] = None,
) -> Float[Tensor, "batch heads seq head_dim"]:
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        # Same head mapping as transformers' repeat_kv: kv head j serves query heads j*g..j*g+g-1.
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if window is None and segment_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    allowed = visible(q.shape[2], window=window, segment_ids=segment_ids, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


@functools.cache
def _flex(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def _mask_mod(window: Optional[int], segment_ids: Optional[Tensor]):
    @no_type_check  # FlexAttention counts mask_mod's parameters: keep the shape-check hook off it
    def mask_mod(b, h, q_idx, kv_idx):
        allowed = kv_idx <= q_idx
        if window is not None:
            allowed = allowed & (q_idx - kv_idx < window)
        if segment_ids is not None:
            allowed = allowed & (segment_ids[b, q_idx] == segment_ids[b, kv_idx])
        return allowed

    return mask_mod


@functools.lru_cache(maxsize=16)
def _window_block_mask(seq: int, window: int, device: torch.device):
    """A pure function of (seq, window, device), so it is built once: every layer of every step
    reuses it, and FlexAttention sees the same ``mask_mod`` object (no recompilation)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_mask_mod(window, None), None, None, seq, seq, device=device)


def _segment_block_mask(segment_ids: Tensor, window: Optional[int], seq: int, *, compile: bool):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_mask_mod(window, segment_ids), segment_ids.shape[0], None, seq, seq,
                             device=segment_ids.device, _compile=compile)


class _SegmentMaskCache:
    """Block masks of the last few ``segment_ids`` tensors, keyed by the tensor itself (held weakly,
    checked with its in-place version counter): the layers of one forward pass share one build.
    A new or modified tensor is a miss, so a stale mask is never returned. Eager code only: traced
    by dynamo, the identity test becomes a guard that let a later batch reuse an earlier batch's
    mask (measured: a compiled two-layer model off by 0.12 on every other batch)."""

    def __init__(self, size: int = 4):
        self.size, self.entries = size, []

    def get(self, segment_ids: Tensor, window: Optional[int], seq: int):
        for ref, version, key, block_mask in self.entries:
            if ref() is segment_ids and version == segment_ids._version and key == (window, seq):
                return block_mask
        block_mask = _segment_block_mask(segment_ids, window, seq, compile=segment_ids.device.type == "cuda")
        entry = (weakref.ref(segment_ids), segment_ids._version, (window, seq), block_mask)
        self.entries = [entry] + [e for e in self.entries if e[0]() is not None][: self.size - 1]
        return block_mask


_SEGMENT_MASKS = _SegmentMaskCache()
# The block masks of the batch a compiled part is running on, by (window, segment_ids' shape): see
# prepared_block_masks. Empty outside it.
_PREPARED: dict[tuple, object] = {}


@contextlib.contextmanager
def prepared_block_masks(segment_ids: Int[Tensor, "batch seq"], windows: Iterable[Optional[int]]) -> Iterator[None]:
    """FlexAttention's block masks of ``segment_ids`` for each of ``windows``, built now (eagerly,
    through the cache), for the code that ``torch.compile`` traces inside the ``with``: there a
    prepared mask is read as a graph input. Without one, traced attention builds its mask inside the
    graph (every layer again: correct, and slower). Attention inside must use these ``segment_ids``
    (any tensor of their shape is taken for them)."""
    seq = segment_ids.shape[-1]
    keys = [(window, tuple(segment_ids.shape)) for window in windows]
    for key in keys:
        _PREPARED[key] = _SEGMENT_MASKS.get(segment_ids, key[0], seq)
    try:
        yield
    finally:
        for key in keys:
            _PREPARED.pop(key, None)


def _document_block_mask(segment_ids: Tensor, window: Optional[int], seq: int):
    """The cache's mask in eager code; traced, the prepared one or one built in the graph."""
    if not torch.compiler.is_compiling():
        return _SEGMENT_MASKS.get(segment_ids, window, seq)
    prepared = _PREPARED.get((window, tuple(segment_ids.shape)))
    return _segment_block_mask(segment_ids, window, seq, compile=False) if prepared is None else prepared


def _flex_attention(q, k, v, window, segment_ids):
    seq = q.shape[2]
    if segment_ids is None:
        block_mask = _window_block_mask(seq, window, q.device)
    else:
        block_mask = _document_block_mask(segment_ids, window, seq)
    return _flex(q.device.type == "cuda")(q, k, v, block_mask=block_mask, enable_gqa=True)


def attention(
    q: Float[Tensor, "batch heads seq head_dim"],
    k: Float[Tensor, "batch kv_heads seq head_dim"],
    v: Float[Tensor, "batch kv_heads seq head_dim"],
    *,
    window: Optional[int] = None,
    segment_ids: Optional[Int[Tensor, "batch seq"]] = None,
    impl: Choice = "auto",
) -> Float[Tensor, "batch heads seq head_dim"]:
    """``softmax(q k^T / sqrt(head_dim) + mask) v`` with grouped-query heads."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: kv heads {k.shape[1]} must divide query heads {q.shape[1]}")
    if resolve(impl, q.device) == "torch":
        return attention_reference(q, k, v, window=window, segment_ids=segment_ids)
    if window is None and segment_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return _flex_attention(q, k, v, window, segment_ids)
