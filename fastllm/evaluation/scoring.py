"""Scoring text with a model, the primitives an evaluation harness asks for.

``continuation_logprobs``: for each (context ids, continuation ids), the summed log-probability of
the continuation given the context and whether greedy decoding would have produced it (a
loglikelihood request of lm-evaluation-harness). ``rolling_logprob``: the log-probability of a
whole token sequence, scored in windows of the model's ``max_seq_len`` where each window after the
first conditions on the tokens just before it (a perplexity request). Contexts longer than the model
keep their end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["continuation_logprobs", "rolling_logprob"]


def _logprobs(model_config: Any, params: Any, ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(``log p`` of every next token ``[1, len(ids) - 1, vocab]``, the next tokens ``[len(ids) - 1]``)."""
    from fastllm import models

    device = params["embed"]["tokens"].device
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=device)
    with torch.no_grad():
        logits = models.apply(model_config, params, tokens[:, :-1]).float()  # [1, n - 1, vocab]
    logp = torch.log_softmax(logits, dim=-1)
    return logp, tokens[0, 1:]


def continuation_logprobs(model_config: Any, params: Any,
                          pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
    """``(sum log p(continuation | context), greedy)`` for each ``(context, continuation)`` of ids;
    the context must hold at least one id (a BOS or EOS when the text has none)."""
    out = []
    for context, continuation in pairs:
        if not context or not continuation:
            raise ValueError("continuation_logprobs: the context and the continuation need at least one id each")
        ids = (list(context) + list(continuation))[-(model_config.max_seq_len + 1):]
        logp, targets = _logprobs(model_config, params, ids)
        n = len(continuation)
        picked = logp[0, -n:].gather(-1, targets[-n:, None])[:, 0]
        greedy = bool((logp[0, -n:].argmax(-1) == targets[-n:]).all())
        out.append((float(picked.sum()), greedy))
    return out


def rolling_logprob(model_config: Any, params: Any, ids: Sequence[int], prefix: int) -> float:
    """Sum of ``log p`` of every id of ``ids`` (the first conditioned on ``prefix``, a BOS/EOS id),
    in windows of at most ``max_seq_len`` tokens."""
    ids = [prefix] + list(ids)
    window = model_config.max_seq_len
    total, start = 0.0, 1  # ids[start:end] are scored by this window
    while start < len(ids):
        end = min(start + window, len(ids))
        context_start = max(0, end - window - 1)
        logp, targets = _logprobs(model_config, params, ids[context_start:end])
        scored = end - start
        total += float(logp[0, -scored:].gather(-1, targets[-scored:, None]).sum())
        start = end
    return total
