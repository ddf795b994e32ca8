"""Which parameters get weight decay: predicates ``mask(path, leaf) -> bool`` on dotted paths.

The default follows common LLM practice (GPT-2/nanoGPT, Llama): decay the weight *matrices* used in
matmuls and nothing else. Precisely, :func:`default_decay_mask` decays a leaf when

1. it has ``ndim >= 2`` (vectors are biases and norm scales), and
2. no component of its dotted path names an embedding, a norm or a bias (a stacked ``[layers, dim]``
   norm scale or a ``[heads, head_dim]`` attention bias is 2-D but still excluded):

   * embeddings: a component that is, or has an ``_``-separated word, ``embed``, ``embeds``,
     ``embedding``, ``embeddings``, ``wte`` or ``wpe`` (``embed.tokens``, ``tok_embeddings``,
     ``pos_embed``); an output projection named ``unembed`` or ``lm_head`` *is* decayed;
   * norms: a word ``norm``, ``ln``, ``layernorm``, ``rmsnorm`` optionally followed by digits
     (``attention_norm.scale``, ``ln_f``, ``ln_1``, ``input_layernorm``);
   * biases: a component ``bias``, ``b``, ``bq``/``bk``/``bv``/``bo``, ``b_<name>`` or ``<name>_bias``.

``decay_mask(embeddings=True)`` also decays embedding tables; ``decay_all`` decays every leaf
(what ``torch.optim.AdamW`` does).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = ["Mask", "decay_mask", "default_decay_mask", "decay_all", "is_embedding", "is_norm",
           "is_bias"]

Mask = Callable[[str, Any], bool]

_EMBEDDING = re.compile(r"(^|_)(embed|embeds|embedding|embeddings|wte|wpe)(_|$)")
_NORM = re.compile(r"(^|_)(norm|ln|layernorm|rmsnorm)\d*(_|$)")
_BIAS = re.compile(r"^(bias|b|b[qkvo]|b_\w+|\w+_bias)$")


def _any_component(pattern: re.Pattern, path: str) -> bool:
    return any(pattern.search(part) is not None for part in path.split("."))


def is_embedding(path: str) -> bool:
    return _any_component(_EMBEDDING, path)


def is_norm(path: str) -> bool:
    return _any_component(_NORM, path)


def is_bias(path: str) -> bool:
    return _any_component(_BIAS, path)


def decay_mask(*, embeddings: bool = False, min_ndim: int = 2) -> Mask:
    """The default rule, with embedding tables optionally decayed and a different rank cut-off."""

    def mask(path: str, leaf: Any) -> bool:
        if getattr(leaf, "ndim", 0) < min_ndim or is_norm(path) or is_bias(path):
            return False
        return embeddings or not is_embedding(path)

    return mask


default_decay_mask: Mask = decay_mask()


def decay_all(path: str, leaf: Any) -> bool:
    """Decay every parameter (``torch.optim.AdamW`` semantics)."""
    return True
