"""Evaluating trained models: loss and perplexity on held-out data (``fastllm eval``), and an
adapter that lets EleutherAI's lm-evaluation-harness score fastllm models (the ``eval`` extra)."""

from fastllm.evaluation.perplexity import EvalResult, evaluate_checkpoint, evaluate_params
from fastllm.evaluation.scoring import continuation_logprobs, rolling_logprob

__all__ = ["EvalResult", "evaluate_checkpoint", "evaluate_params", "continuation_logprobs", "rolling_logprob"]
