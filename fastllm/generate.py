"""Autoregressive sampling with a key/value cache.

The prompt runs once through :func:`fastllm.models.forward` with an empty cache
(:func:`fastllm.models.decoder.init_cache`), which returns each layer's keys and values
(``[batch, kv_heads, seq, head_dim]``, rotary applied); every new token then runs alone against the
cache, so a step costs O(seq) instead of O(seq^2). The model code is the same with or without the
cache, and decoding is tested to give the uncached model's logits and tokens.

Sampling: greedy when ``temperature == 0``; otherwise softmax(logits / temperature) restricted to
the ``top_k`` most likely tokens and to the smallest set whose probability reaches ``top_p``
(nucleus sampling, Holtzman et al. 2020), drawn from ``fold_in(key, step)``.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from fastllm import models, random
from fastllm.errors import UserError
from fastllm.models.config import ModelConfig
from fastllm.models.decoder import init_cache

__all__ = ["sample_next", "generate", "generate_text"]


def sample_next(
    logits: Float[Tensor, "batch vocab"],
    key: Optional[random.Key],
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
) -> Int[Tensor, "batch"]:
    """One token per row: argmax at temperature 0, else a draw from the filtered distribution."""
    _check_sampling(temperature, top_k, top_p)
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


def _check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """Refuse settings that would crash deep in torch (top_k=0) or sample nonsense (temperature < 0)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1 (or None), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1] (or None), got {top_p}")


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
    _check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0 or prompt.shape[1] < 1:
        raise UserError(f"need a prompt of at least one token and max_new_tokens >= 0, got {prompt.shape[1]} "
                        f"and {max_new_tokens}")
    total = prompt.shape[1] + max_new_tokens
    if total > config.max_seq_len:
        raise UserError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's max_seq_len={config.max_seq_len}")
    dtype = params["embed"]["tokens"].dtype
    cache = init_cache(config, prompt.shape[0], dtype=dtype, device=prompt.device) if use_cache else None
    tokens, done = prompt, torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for step in range(max_new_tokens):
        if use_cache:  # the tokens the cache has not seen yet: the prompt, then the last token
            logits, _, cache = models.forward(config, params, tokens[:, cache[0].length:], cache=cache)
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


def generate_text(config: ModelConfig, params: dict, tokenizer, prompt: str, *, max_new_tokens: int,
                  temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  seed: int = 0) -> str:
    """``prompt`` and its sampled continuation, through a ``tokenizers.Tokenizer`` (or tokenizer.json).

    A prompt longer than ``max_seq_len - max_new_tokens`` tokens keeps its end (the latest context).
    Refuses a tokenizer whose ids do not fit the model, a prompt that encodes to no tokens and a
    ``max_new_tokens`` that leaves no room for the prompt.
    """
    from fastllm.data.tokenizer import read_tokenizer, vocab_size

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = read_tokenizer(tokenizer)
    if vocab_size(tokenizer) > config.vocab_size:
        raise UserError(f"the tokenizer has {vocab_size(tokenizer)} ids but the model's vocab_size is "
                        f"{config.vocab_size}: it is another model's tokenizer")
    if not 1 <= max_new_tokens < config.max_seq_len:
        raise UserError(f"max_new_tokens must be in [1, {config.max_seq_len - 1}] (the model's max_seq_len is "
                        f"{config.max_seq_len}), got {max_new_tokens}")
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids[-(config.max_seq_len - max_new_tokens):]
    if not ids:
        raise UserError(f"the prompt {prompt!r} encodes to no tokens")
    device = params["embed"]["tokens"].device
    out = generate(config, params, torch.tensor([ids], dtype=torch.long, device=device),
                   max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   key=random.key(seed))
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=False)
