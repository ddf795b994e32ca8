"""Tiny random transformers models of the six families, built from their own config classes."""

import torch
import transformers

from fastllm.hf import rules
from fastllm.hf.families import by_family

SEQ = 12  # longer than every sliding window below
VOCAB = 96


def _common(**overrides):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, bos_token_id=None, eos_token_id=None)
    base.update(overrides)
    return base


def _gpt_common(**overrides):
    base = dict(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                bos_token_id=None, eos_token_id=None)
    base.update(overrides)
    return base


# name -> (what the case covers, transformers config)
CASES = {
    "gpt2": ("learned positions, Conv1D, tied head",
             lambda: transformers.GPT2Config(**_gpt_common())),
    "starcoder": ("multi-query c_attn, untied head",
                  lambda: transformers.GPTBigCodeConfig(**_gpt_common(multi_query=True, tie_word_embeddings=False))),
    "starcoder_mha": ("per-head interleaved c_attn",
                      lambda: transformers.GPTBigCodeConfig(**_gpt_common(multi_query=False,
                                                                          activation_function="gelu"))),
    "llama": ("GQA, llama3 rope scaling", lambda: transformers.LlamaConfig(**_common(
        num_key_value_heads=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}))),
    "llama_bias": ("attention_bias, mlp_bias, linear rope, MQA", lambda: transformers.LlamaConfig(**_common(
        num_key_value_heads=1, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}))),
    "mistral": ("sliding window 4 on every layer, GQA, head_dim 16 != hidden/heads",
                lambda: transformers.MistralConfig(**_common(num_key_value_heads=2, sliding_window=4, head_dim=16))),
    "mixtral": ("MoE top-2 of 4 experts, GQA", lambda: transformers.MixtralConfig(**_common(
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02))),
    "qwen2": ("QKV bias, tied head, window on layers >= max_window_layers", lambda: transformers.Qwen2Config(**_common(
        num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True, sliding_window=4,
        max_window_layers=1))),
}


def build_hf_model(name: str, seed: int = 0):
    """A random model whose every weight (norm scales and biases too) is far from its init value."""
    torch.manual_seed(seed)
    config = CASES[name][1]()
    config._attn_implementation = "eager"  # the eager path applies the sliding-window mask exactly
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tokens(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def hf_to_ours(config, tensors: dict) -> dict:
    """HF-named tensors (weights or gradients) -> our flat names, through the converter's own rules."""
    mapping = by_family(config.family).mapping
    return rules.load_tensors(mapping.rules(config, frozenset(tensors)), tensors.__getitem__, set(tensors),
                              lambda name: mapping.is_ignored(name, config), "test")
