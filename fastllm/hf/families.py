"""The six supported Hugging Face architectures: names, config classes and weight rules."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from fastllm.hf import gpt2, llama
from fastllm.hf.common import UnsupportedConfig

__all__ = ["Family", "FAMILIES", "by_model_type", "by_family"]


@dataclass(frozen=True)
class Family:
    family: str  # ModelConfig.family
    model_type: str  # config.json "model_type"
    architecture: str  # config.json "architectures"[0]
    config_class: str  # transformers config class name
    mapping: ModuleType  # config_from_hf, config_to_hf, rules, is_ignored
    base_prefix: str  # where the decoder's weights live in the state dict


FAMILIES = (
    Family("gpt2", "gpt2", "GPT2LMHeadModel", "GPT2Config", gpt2, "transformer."),
    Family("starcoder", "gpt_bigcode", "GPTBigCodeForCausalLM", "GPTBigCodeConfig", gpt2, "transformer."),
    Family("llama", "llama", "LlamaForCausalLM", "LlamaConfig", llama, "model."),
    Family("mistral", "mistral", "MistralForCausalLM", "MistralConfig", llama, "model."),
    Family("mixtral", "mixtral", "MixtralForCausalLM", "MixtralConfig", llama, "model."),
    Family("qwen2", "qwen2", "Qwen2ForCausalLM", "Qwen2Config", llama, "model."),
)


def by_model_type(raw: dict, source: str) -> Family:
    """The family of a raw config.json, checking ``model_type`` and ``architectures``."""
    model_type = raw.get("model_type")
    matches = [f for f in FAMILIES if f.model_type == model_type]
    if not matches:
        raise UnsupportedConfig(f"{source}: unsupported model_type = {model_type!r}; "
                                f"supported: {[f.model_type for f in FAMILIES]}")
    family = matches[0]
    architectures = raw.get("architectures") or [family.architecture]
    if list(architectures) != [family.architecture]:
        raise UnsupportedConfig(f"{source}: unsupported architectures = {architectures!r} for model_type "
                                f"{model_type!r}; fastllm loads {family.architecture!r} (a causal LM head)")
    return family


def by_family(name: str) -> Family:
    for family in FAMILIES:
        if family.family == name:
            return family
    raise UnsupportedConfig(f"config.family = {name!r} has no Hugging Face architecture; "
                            f"use one of {[f.family for f in FAMILIES]}")
