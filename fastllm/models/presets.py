"""Published model shapes, by name, as :class:`ModelConfig`; plus tiny CPU variants for tests.

Shapes come from each model's Hugging Face ``config.json`` (vocab, widths, heads, rotary theta and
scaling, window, tying, norm epsilon); their parameter counts are asserted in tests/models.
"""

from __future__ import annotations

from fastllm.models.config import MoEConfig, ModelConfig, RopeConfig

__all__ = ["PRESETS", "preset"]

_GPT2_STYLE = dict(
    activation="gelu_tanh", gated_mlp=False, norm="layernorm", norm_eps=1e-5, positions="learned",
    qkv_bias=True, attention_out_bias=True, mlp_bias=True, tie_embeddings=True,
)

PRESETS: dict[str, ModelConfig] = {
    # openai-community/gpt2
    "gpt2": ModelConfig(
        vocab_size=50257, embed_dim=768, n_layers=12, n_heads=12, mlp_dim=3072, max_seq_len=1024,
        family="gpt2", **_GPT2_STYLE,
    ),
    # bigcode/starcoderbase-1b: GPT-BigCode, multi-query attention
    "starcoder-1b": ModelConfig(
        vocab_size=49152, embed_dim=2048, n_layers=24, n_heads=16, n_kv_heads=1, mlp_dim=8192,
        max_seq_len=8192, family="starcoder", **_GPT2_STYLE,
    ),
    # meta-llama/Llama-2-7b-hf
    "llama2-7b": ModelConfig(
        vocab_size=32000, embed_dim=4096, n_layers=32, n_heads=32, mlp_dim=11008, norm_eps=1e-5,
        max_seq_len=4096, rope=RopeConfig(theta=10000.0), family="llama",
    ),
    # meta-llama/Meta-Llama-3-8B
    "llama3-8b": ModelConfig(
        vocab_size=128256, embed_dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, mlp_dim=14336,
        norm_eps=1e-5, max_seq_len=8192, rope=RopeConfig(theta=500000.0), family="llama",
    ),
    # meta-llama/Llama-3.1-8B: the same shapes with Llama-3 rotary scaling and 128k context
    "llama3.1-8b": ModelConfig(
        vocab_size=128256, embed_dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, mlp_dim=14336,
        norm_eps=1e-5, max_seq_len=131072, family="llama",
        rope=RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_positions=8192),
    ),
    # mistralai/Mistral-7B-v0.1
    "mistral-7b": ModelConfig(
        vocab_size=32000, embed_dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, mlp_dim=14336,
        norm_eps=1e-5, max_seq_len=32768, rope=RopeConfig(theta=10000.0), sliding_window=4096,
        family="mistral",
    ),
    # mistralai/Mixtral-8x7B-v0.1
    "mixtral-8x7b": ModelConfig(
        vocab_size=32000, embed_dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, mlp_dim=14336,
        norm_eps=1e-5, max_seq_len=32768, rope=RopeConfig(theta=1000000.0),
        moe=MoEConfig(n_experts=8, top_k=2, aux_loss_coef=0.02), family="mixtral",
    ),
    # Qwen/Qwen2-0.5B
    "qwen2-0.5b": ModelConfig(
        vocab_size=151936, embed_dim=896, n_layers=24, n_heads=14, n_kv_heads=2, mlp_dim=4864,
        norm_eps=1e-6, max_seq_len=32768, rope=RopeConfig(theta=1000000.0), qkv_bias=True,
        tie_embeddings=True, family="qwen2",
    ),
    # HuggingFaceTB/SmolLM2-135M (a Llama)
    "smollm2-135m": ModelConfig(
        vocab_size=49152, embed_dim=576, n_layers=30, n_heads=9, n_kv_heads=3, mlp_dim=1536,
        norm_eps=1e-5, max_seq_len=8192, rope=RopeConfig(theta=100000.0), tie_embeddings=True,
        family="llama",
    ),
}

# Tiny variants: same family features, small enough to train in seconds on one CPU core.
_TINY = dict(vocab_size=256, embed_dim=64, n_layers=2, n_heads=4, mlp_dim=128, max_seq_len=128)
PRESETS.update({
    "tiny-llama": PRESETS["llama2-7b"].replace(**_TINY, n_kv_heads=2),
    "tiny-gpt2": PRESETS["gpt2"].replace(**_TINY, n_kv_heads=4),
    "tiny-starcoder": PRESETS["starcoder-1b"].replace(**_TINY, n_kv_heads=1),
    "tiny-mistral": PRESETS["mistral-7b"].replace(**_TINY, n_kv_heads=2, sliding_window=8),
    "tiny-mixtral": PRESETS["mixtral-8x7b"].replace(
        **_TINY, n_kv_heads=2, moe=MoEConfig(n_experts=4, top_k=2, aux_loss_coef=0.02)
    ),
    "tiny-qwen2": PRESETS["qwen2-0.5b"].replace(**_TINY, n_kv_heads=2),
})


def preset(name: str, **overrides) -> ModelConfig:
    """The named config, with fields replaced by ``overrides`` (validated again)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    if not overrides:
        return PRESETS[name]
    fields = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"preset {name!r}: unknown ModelConfig field(s) {unknown}")
    return PRESETS[name].replace(**overrides)
