"""The decoder model family as pure functions: ``init``/``apply`` over a params tree.

    config = models.preset("tiny-llama")
    params = models.init(config, fastllm.random.key(0))
    logits = models.apply(config, params, tokens)
"""

from fastllm.models.config import FAMILIES, MoEConfig, ModelConfig, RopeConfig
from fastllm.models.counting import flops_per_token, matmul_param_count, param_count
from fastllm.models.decoder import (apply, forward, hidden_states, init, init_cache, lm_head, logical_axes, loss,
                                    model, param_specs)
from fastllm.models.presets import PRESETS, preset

__all__ = [
    "ModelConfig",
    "RopeConfig",
    "MoEConfig",
    "FAMILIES",
    "param_specs",
    "model",
    "init",
    "logical_axes",
    "apply",
    "forward",
    "hidden_states",
    "lm_head",
    "init_cache",
    "loss",
    "preset",
    "PRESETS",
    "param_count",
    "matmul_param_count",
    "flops_per_token",
]
