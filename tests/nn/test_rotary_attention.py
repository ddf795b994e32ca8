"""Rotary embeddings and attention against transformers' Llama/Mistral code and a plain softmax."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.masking_utils import sliding_window_causal_mask_function
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from fastllm import nn, random

ROPE_CASES = {
    "default": (dict(rope_type="default"), dict()),
    "linear": (dict(rope_type="linear", factor=4.0), dict(scaling="linear", factor=4.0)),
    "llama3": (
        dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_position_embeddings=64),
        dict(scaling="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_positions=64),
    ),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rotary_matches_transformers_llama(case):
    hf_rope, ours = ROPE_CASES[case]
    head_dim, theta = 32, 500000.0
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_theta": theta, **hf_rope})
    positions = torch.tensor([[0, 1, 2, 3, 700, 3000], [5, 0, 1, 2, 3, 4]])
    q, k = torch.randn(2, 4, 6, head_dim), torch.randn(2, 2, 6, head_dim)
    cos_ref, sin_ref = LlamaRotaryEmbedding(config)(q, positions)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos_ref, sin_ref)

    rot = nn.Rotary(head_dim=head_dim, theta=theta, **ours)
    cos, sin = nn.rotary.cos_sin(rot, positions)
    torch.testing.assert_close(cos, cos_ref)
    torch.testing.assert_close(nn.rotary.apply(q, cos, sin), q_ref)
    torch.testing.assert_close(nn.rotary.apply(k, cos, sin), k_ref)


def test_partial_rotary_rotates_only_the_leading_dims():
    rot = nn.Rotary(head_dim=16, fraction=0.5)
    positions = torch.arange(5)[None]
    x = torch.randn(1, 2, 5, 16)
    cos, sin = nn.rotary.cos_sin(rot, positions)
    assert cos.shape == (1, 5, 8)
    out = nn.rotary.apply(x, cos, sin)
    assert torch.equal(out[..., 8:], x[..., 8:])
    # Pair (i, i + 4) of the rotated 8 dims turns by position * theta^(-2i/8).
    i, pos = 1, 3
    angle = pos * 10000.0 ** (-2 * i / 8)
    a, b = x[0, 0, pos, i], x[0, 0, pos, i + 4]
    torch.testing.assert_close(out[0, 0, pos, i], a * math.cos(angle) - b * math.sin(angle))
    torch.testing.assert_close(out[0, 0, pos, i + 4], b * math.cos(angle) + a * math.sin(angle))


def test_rotary_scores_depend_only_on_relative_position():
    rot = nn.Rotary(head_dim=8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pq, pk):
        cq, sq = nn.rotary.cos_sin(rot, torch.tensor([[pq]]))
        ck, sk = nn.rotary.cos_sin(rot, torch.tensor([[pk]]))
        return (nn.rotary.apply(q, cq, sq) * nn.rotary.apply(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100))


def _reference_attention(q, k, v, allowed):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


def test_mask_equals_transformers_sliding_window_mask():
    window, seq = 3, 7
    ours = nn.attention.mask(seq, window=window)[0, 0]
    fn = sliding_window_causal_mask_function(window)
    idx = [torch.tensor(n) for n in range(seq)]
    theirs = torch.tensor([[bool(fn(idx[0], idx[0], i, j)) for j in idx] for i in idx])
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # multi-head, grouped-query, multi-query
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("packed", [False, True])
def test_dot_product_attention_matches_softmax_reference(kv_heads, window, packed):
    b, h, s, d = 2, 4, 9, 8
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, kv_heads, s, d), torch.randn(b, kv_heads, s, d)
    segment_ids = torch.tensor([[0] * 4 + [1] * 5, [0] * 9]) if packed else None
    i, j = torch.arange(s)[:, None], torch.arange(s)[None]
    allowed = (j <= i) & ((i - j < window) if window else True)
    allowed = allowed[None, None].expand(b, 1, s, s)
    if packed:
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    out = nn.dot_product_attention(q, k, v, window=window, segment_ids=segment_ids)
    torch.testing.assert_close(out, _reference_attention(q, k, v, allowed), atol=1e-5, rtol=1e-5)


def test_attention_layer_projections_biases_and_gqa_head_mapping():
    layer = nn.Attention(embed_dim=12, n_heads=4, n_kv_heads=2, head_dim=5, qkv_bias=True, out_bias=True)
    specs = nn.attention.params(layer)
    assert nn.axes(specs)["wq"] == ("heads", "head_dim", "embed")
    assert nn.axes(specs)["wo"] == ("embed", "heads", "head_dim")
    p = {name: torch.randn(shape) for name, shape in nn.shapes(specs).items()}
    x = torch.randn(2, 6, 12)
    rot = nn.Rotary(head_dim=5, theta=100.0, fraction=0.8)  # partial: 4 of 5 dims rotate
    rope = nn.rotary.cos_sin(rot, torch.arange(6).expand(2, 6))
    out = nn.attention.apply(layer, p, x, rope=rope)

    q = torch.einsum("bse,hde->bhsd", x, p["wq"]) + p["bq"][None, :, None]
    k = torch.einsum("bse,hde->bhsd", x, p["wk"]) + p["bk"][None, :, None]
    v = torch.einsum("bse,hde->bhsd", x, p["wv"]) + p["bv"][None, :, None]
    q, k = nn.rotary.apply(q, *rope), nn.rotary.apply(k, *rope)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    attended = _reference_attention(q, k, v, causal)
    expected = torch.einsum("bhsd,ehd->bse", attended, p["wo"]) + p["bo"]
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_attention_init_uses_out_std_for_wo():
    layer = nn.Attention(embed_dim=64, n_heads=4, std=0.02, out_std=0.005)
    p = nn.init(nn.attention.params(layer), random.key(0))
    assert abs(p["wq"].std().item() - 0.02) < 0.002
    assert abs(p["wo"].std().item() - 0.005) < 0.0005
