"""EleutherAI's lm-evaluation-harness on fastllm models (``pip install 'fastllm[eval]'``).

    python -m fastllm.evaluation.harness --model fastllm --model_args pretrained=runs/quickstart \\
        --tasks hellaswag --batch_size 1

or in Python, with any model directory :func:`fastllm.hf.load_any` reads::

    import lm_eval
    from fastllm.evaluation.harness import FastllmLM

    results = lm_eval.simple_evaluate(model=FastllmLM("runs/quickstart"), tasks=["hellaswag"])

The adapter implements the harness' model interface (``lm_eval.api.model.LM``: ``loglikelihood``,
``loglikelihood_rolling``, ``generate_until``) on :mod:`fastllm.evaluation.scoring` and
:func:`fastllm.generate.generate`, one request at a time, and registers itself as ``fastllm``.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch

from fastllm import random
from fastllm.errors import UserError
from fastllm.evaluation.scoring import continuation_logprobs, rolling_logprob

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # without the eval extra this module still imports; building the adapter says what to install
    LM, register_model = object, None

__all__ = ["FastllmLM"]


class FastllmLM(LM):
    """A fastllm model (run, checkpoint, fastllm or Hugging Face directory) for the harness."""

    def __init__(self, pretrained: str, device: str = "cpu", tokenizer: Optional[str] = None,
                 max_gen_toks: int = 256, **_ignored: Any):
        if register_model is None:
            raise UserError("the lm-evaluation-harness adapter needs lm-eval: pip install 'fastllm[eval]'")
        super().__init__()
        from fastllm import hf
        from fastllm.data.tokenizer import read_tokenizer

        loaded = hf.load_any(pretrained, dtype=torch.float32, device=device)
        path = tokenizer or loaded.tokenizer
        if path is None:
            raise UserError(f"{pretrained}: no tokenizer.json saved with the model; pass tokenizer=PATH")
        self.config, self.params, self.tokenizer = loaded.config, loaded.params, read_tokenizer(path)
        eos = loaded.eos_token or "<|endoftext|>"
        eos_id = self.tokenizer.token_to_id(eos)
        self.prefix_id = 0 if eos_id is None else eos_id  # what an empty context conditions on
        self.max_gen_toks = int(max_gen_toks)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, split where the whole text's tokens split (a
        space ending the context belongs to the continuation's first token)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, head = self._encode(context + continuation), self._encode(context)
        return (head or [self.prefix_id]), whole[len(head):]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._split(*request.args) for request in requests]
        return continuation_logprobs(self.config, self.params, pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        return [rolling_logprob(self.config, self.params, self._encode(request.args[0]), self.prefix_id)
                for request in requests]

    def generate_until(self, requests) -> list[str]:
        return [self._generate(*request.args) for request in requests]

    def _generate(self, context: str, gen_kwargs: dict) -> str:
        from fastllm.generate import generate

        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        budget = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        ids = (self._encode(context) or [self.prefix_id])[-(self.config.max_seq_len - 1):]
        budget = max(1, min(budget, self.config.max_seq_len - len(ids)))
        prompt = torch.tensor([ids], dtype=torch.long, device=self.params["embed"]["tokens"].device)
        out = generate(self.config, self.params, prompt, max_new_tokens=budget,
                       temperature=float(gen_kwargs.get("temperature", 0.0)), key=random.key(0))
        text = self.tokenizer.decode(out[0, len(ids):].tolist())
        cuts = [text.index(stop) for stop in until if stop in text]
        return text[:min(cuts)] if cuts else text


if register_model is not None:
    register_model("fastllm")(FastllmLM)  # lm_eval --model fastllm, once this module is imported

if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())
