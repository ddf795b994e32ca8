"""Presets: published parameter counts, FLOP formula, errors, and a cross-check against transformers."""

import pytest
import torch

from fastllm import models

PUBLISHED = {
    "gpt2": 124_439_808,
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
    "qwen2-0.5b": 494_032_768,
    "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_count_matches_published_size(name):
    assert models.param_count(models.preset(name)) == PUBLISHED[name]


def test_mixtral_active_parameters():
    config = models.preset("mixtral-8x7b")
    active = models.param_count(config, active=True)
    # 6 of 8 experts idle in each of 32 layers, 3 matrices of 4096 x 14336 each.
    assert active == PUBLISHED["mixtral-8x7b"] - 32 * 6 * 3 * 4096 * 14336
    assert 12.8e9 < active < 13.0e9


def test_starcoder_count_equals_transformers_gpt_bigcode_on_meta():
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    hf_config = GPTBigCodeConfig(vocab_size=49152, n_positions=8192, n_embd=2048,
                         n_layer=24, n_head=16, n_inner=8192, multi_query=True,
                                 bos_token_id=0, eos_token_id=0)
    with torch.device("meta"):
        model = GPTBigCodeForCausalLM(hf_config)
    expected = sum(p.numel() for p in model.parameters())  # tied head counted once
    assert models.param_count(models.preset("starcoder-1b")) == expected


def test_flops_per_token_formula_for_llama2():
    config = models.preset("llama2-7b")
    embed, mlp, layers, vocab = 4096, 11008, 32, 32000
    matmul = layers * (4 * embed * embed + 3 * embed * mlp) + vocab * embed  # lm head, no lookup
    assert models.flops_per_token(config, 2048) == 6 * matmul + 6 * layers * 2048 * embed


def test_flops_count_tied_head_once_and_active_experts_only():
    gpt2 = models.preset("gpt2")
    per_layer = 4 * 768 * 768 + 2 * 768 * 3072
    assert models.flops_per_token(gpt2, 1024) == 6 * (12 * per_layer + 50257 * 768) + 6 * 12 * 1024 * 768
    mixtral = models.preset("mixtral-8x7b")
    attention = 4096 * 4096 * 2 + 2 * 1024 * 4096
    per_layer = attention + 2 * 3 * 4096 * 14336 + 8 * 4096  # two active experts + router
    expected = 6 * (32 * per_layer + 32000 * 4096) + 6 * 32 * 4096 * 4096
    assert models.flops_per_token(mixtral, 4096) == expected


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown model preset 'llama9'.*tiny-llama"):
        models.preset("llama9")


def test_preset_overrides_are_validated():
    assert models.preset("tiny-llama", n_layers=3).n_layers == 3
    with pytest.raises(TypeError, match="n_layer"):
        models.preset("tiny-llama", n_layer=3)
    with pytest.raises(ValueError, match="n_kv_heads"):
        models.preset("tiny-llama", n_kv_heads=3)


def test_required_presets_exist_with_family_features():
    required = {"gpt2", "starcoder-1b", "llama2-7b", "llama3-8b", "mistral-7b", "mixtral-8x7b",
                "qwen2-0.5b", "smollm2-135m", "tiny-llama", "tiny-gpt2", "tiny-starcoder",
                "tiny-mistral", "tiny-mixtral", "tiny-qwen2"}
    assert required <= set(models.PRESETS)
    assert models.preset("starcoder-1b").n_kv_heads == 1
    assert models.preset("mistral-7b").sliding_window == 4096
    assert models.preset("llama3.1-8b").rope.scaling == "llama3"
    assert models.preset("qwen2-0.5b").qkv_bias and models.preset("qwen2-0.5b").tie_embeddings
    for name in required:
        if name.startswith("tiny-"):
            base = models.preset(name)
            assert models.param_count(base) < 1_000_000 and base.family != "custom"


def test_replace_derives_head_dim_and_kv_heads_again():
    small = models.preset("llama2-7b", embed_dim=64, n_heads=4)
    assert (small.head_dim, small.n_kv_heads) == (16, 4)
    assert models.preset("tiny-llama").head_dim == 16
    explicit = models.preset("llama2-7b", head_dim=64, embed_dim=1024)
    assert explicit.head_dim == 64
    gqa = models.preset("llama3-8b", n_heads=16)  # grouped-query heads are kept as given
    assert gqa.n_kv_heads == 8 and gqa.head_dim == 256
