"""Hugging Face transformers checkpoints in and out (safetensors only, no remote code).

Six architectures: GPT2LMHeadModel, GPTBigCodeForCausalLM, LlamaForCausalLM, MistralForCausalLM,
MixtralForCausalLM, Qwen2ForCausalLM. See docs/huggingface.md.
"""

from fastllm.hf.api import DEFAULT_MAX_SHARD_BYTES, convert, load, load_config, save
from fastllm.hf.common import UnsupportedConfig
from fastllm.hf.formats import FORMATS, Loaded, detect, load_any
from fastllm.hf.families import FAMILIES

__all__ = ["load", "save", "convert", "load_config", "load_any", "detect", "Loaded", "FORMATS", "UnsupportedConfig",
           "FAMILIES", "DEFAULT_MAX_SHARD_BYTES"]
