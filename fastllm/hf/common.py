"""Pieces every family shares: activation names, rotary settings, sliding-window layers, the LM
head, errors.

Whatever we cannot represent raises :class:`UnsupportedConfig` naming the Hugging Face field and its
value, so a checkpoint never loads with silently different maths.
"""

from __future__ import annotations

from fastllm.errors import UserError
from fastllm.hf.rules import Rule, rename
from fastllm.models.config import ModelConfig, RopeConfig
from fastllm.models.decoder import layer_window

__all__ = [
    "UnsupportedConfig",
    "unsupported",
    "require_equal",
    "activation_from_hf",
    "activation_to_hf",
    "rope_from_hf",
    "rope_to_hf",
    "window_pattern",
    "window_fields",
    "head_rules",
    "is_tied_head",
]


class UnsupportedConfig(UserError):
    """A Hugging Face config (or a ModelConfig to export) uses a feature fastllm does not implement."""


def unsupported(family: str, field: str, value, why: str = "") -> UnsupportedConfig:
    detail = f": {why}" if why else ""
    return UnsupportedConfig(f"{family}: unsupported {field} = {value!r}{detail}")


def require_equal(config: ModelConfig, field: str, expected) -> None:
    """Export check: a ModelConfig field the target architecture fixes."""
    value = config
    for part in field.split("."):
        value = getattr(value, part)
    if value != expected:
        raise UnsupportedConfig(f"{config.family}: the Hugging Face architecture needs {field} = {expected!r}, "
                                f"the config has {value!r}")


# transformers' ACT2FN names -> ours. gelu_new (GPT-2) and gelu_pytorch_tanh are both the tanh form.
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def activation_from_hf(family: str, field: str, name: str) -> str:
    if name not in _ACTIVATIONS:
        raise unsupported(family, field, name, f"supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def activation_to_hf(activation: str, tanh_name: str = "gelu_pytorch_tanh") -> str:
    return {"silu": "silu", "gelu": "gelu", "gelu_tanh": tanh_name, "relu": "relu"}[activation]


def rope_from_hf(family: str, rope: dict, max_positions: int) -> RopeConfig:
    """transformers' standardised ``rope_parameters`` -> RopeConfig (default, linear or llama3 only)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise unsupported(family, "rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"],
                          "this architecture rotates the whole head")
    theta = float(rope.get("rope_theta", 10000.0))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, scaling="linear", factor=float(rope["factor"]))
    if kind == "llama3":
        return RopeConfig(theta=theta, scaling="llama3", factor=float(rope["factor"]),
                          low_freq_factor=float(rope["low_freq_factor"]),
                          high_freq_factor=float(rope["high_freq_factor"]),
                          original_max_positions=int(rope.get("original_max_position_embeddings", max_positions)))
    raise unsupported(family, "rope_parameters.rope_type", kind, "supported: default, linear, llama3")


def rope_to_hf(config: ModelConfig) -> dict:
    rope = config.rope
    require_equal(config, "rope.fraction", 1.0)
    if rope.scaling == "none":
        return {"rope_type": "default", "rope_theta": rope.theta}
    if rope.scaling == "linear":
        return {"rope_type": "linear", "rope_theta": rope.theta, "factor": rope.factor}
    return {"rope_type": "llama3", "rope_theta": rope.theta, "factor": rope.factor,
            "low_freq_factor": rope.low_freq_factor, "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_positions}


def window_pattern(config: ModelConfig) -> list[bool]:
    """Which layers use the sliding window (the decoder's own rule, so the two cannot disagree)."""
    return [layer_window(config, i) is not None for i in range(config.n_layers)]


def window_fields(family: str, pattern: list[bool], window: int | None, field: str) -> dict:
    """``sliding_window`` / ``sliding_window_layers`` for ModelConfig giving ``pattern``, or an error.

    ModelConfig expresses "full attention below layer n, the window from layer n on" (Qwen2's
    ``max_window_layers``); any other mix is refused.
    """
    if window is None or not any(pattern):
        return {"sliding_window": None, "sliding_window_layers": None}
    first = pattern.index(True)
    if not all(pattern[first:]):
        raise unsupported(family, field, ["sliding" if p else "full" for p in pattern],
                          "ModelConfig expresses only full layers followed by sliding-window layers")
    return {"sliding_window": window, "sliding_window_layers": first or None}


def head_rules(config: ModelConfig) -> list[Rule]:
    """transformers' ``lm_head.weight``; a tied head is the token embedding and has no rule."""
    return [] if config.tie_embeddings else [rename("lm_head.weight", "lm_head.w")]


def is_tied_head(name: str, config: ModelConfig) -> bool:
    """The duplicate ``lm_head.weight`` some files carry for a tied head (ignored on load)."""
    return config.tie_embeddings and name == "lm_head.weight"
