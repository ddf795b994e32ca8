"""Each layer against a straightforward torch reference (or transformers' own module)."""

import math

import pytest
import torch
import torch.nn.functional as F
from jaxtyping import TypeCheckError

from fastllm import nn, random


def _init(specs, seed=0):
    return nn.init(specs, random.key(seed))


def test_linear_matches_matmul_with_and_without_bias():
    x = torch.randn(2, 3, 8)
    for bias in (False, True):
        specs = nn.linear.params(8, 5, bias=bias, axes=("mlp", "embed"))
        assert nn.axes(specs)["w"] == ("mlp", "embed")
        p = _init(specs)
        if bias:
            p["b"] = torch.randn(5)
            assert nn.axes(specs)["b"] == ("mlp",)
        expected = x @ p["w"].T + (p["b"] if bias else 0)
        torch.testing.assert_close(nn.linear.apply(p, x), expected)


def test_embedding_is_a_row_lookup():
    table = _init(nn.embedding.params(10, 4))
    ids = torch.tensor([[3, 0, 9]])
    out = nn.embedding.apply(table, ids)
    assert torch.equal(out[0, 2], table[9]) and out.shape == (1, 3, 4)


def test_layer_norm_matches_torch_module():
    x = torch.randn(2, 5, 16)
    p = {"scale": torch.randn(16), "bias": torch.randn(16)}
    ref = torch.nn.LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(p["scale"]), ref.bias.copy_(p["bias"])
    torch.testing.assert_close(nn.norm.apply(p, x, eps=1e-5), ref(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_formula(dtype):
    x = torch.randn(2, 5, 16).to(dtype)
    scale = torch.randn(16).to(dtype)
    x32 = x.float()
    expected = scale * (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    out = nn.norm.apply({"scale": scale}, x, eps=1e-6)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected)


def test_norm_params_by_kind():
    assert set(nn.norm.params(8, kind="rmsnorm")) == {"scale"}
    assert set(nn.norm.params(8, kind="layernorm")) == {"scale", "bias"}
    with pytest.raises((ValueError, TypeCheckError), match="batchnorm"):
        nn.norm.params(8, kind="batchnorm")


def _mlp_reference(p, x, act, gated):
    up = x @ p["w_up"].T + p.get("b_up", 0)
    hidden = act(x @ p["w_gate"].T + p.get("b_gate", 0)) * up if gated else act(up)
    return hidden @ p["w_down"].T + p.get("b_down", 0)


@pytest.mark.parametrize(
    "activation, gated, bias, act",
    [
        ("silu", True, False, lambda t: t * torch.sigmoid(t)),
        ("gelu", True, False, lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))),
        ("gelu_tanh", False, True,
         lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3)))),
        ("relu", False, False, lambda t: t.clamp(min=0)),
    ],
)
def test_mlp_matches_reference(activation, gated, bias, act):
    layer = nn.MLP(embed_dim=8, mlp_dim=12, activation=activation, gated=gated, bias=bias)
    p = _init(nn.mlp.params(layer))
    if bias:
        p = {k: torch.randn_like(v) if k.startswith("b_") else v for k, v in p.items()}
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(nn.mlp.apply(layer, p, x), _mlp_reference(p, x, act, gated))
    assert ("w_gate" in p) == gated and ("b_up" in p) == bias


def test_unknown_activation_is_a_clear_error():
    with pytest.raises((ValueError, TypeCheckError), match="swish"):
        nn.MLP(embed_dim=8, mlp_dim=8, activation="swish")


def test_cross_entropy_ignores_minus_100_and_weights_by_mask():
    logits = torch.randn(2, 4, 7)
    targets = torch.randint(0, 7, (2, 4))
    targets[0, 1] = -100
    loss, valid = nn.cross_entropy(logits, targets)
    expected = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    assert valid.item() == 7
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1] = False
    loss, valid = nn.cross_entropy(logits, targets, loss_mask=mask)
    expected = F.cross_entropy(logits[0], targets[0], ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    assert valid.item() == 3


def test_cross_entropy_is_float32_and_zero_without_valid_tokens():
    logits = torch.randn(1, 3, 5, dtype=torch.bfloat16, requires_grad=True)
    loss, valid = nn.cross_entropy(logits, torch.full((1, 3), -100))
    assert loss.dtype == torch.float32 and loss.item() == 0.0 and valid.item() == 0
    loss.backward()
    assert torch.isfinite(logits.grad.float()).all()


def test_block_is_two_pre_norm_residual_lines():
    attn = nn.Attention(embed_dim=16, n_heads=4, n_kv_heads=2)
    layer = nn.Block(attention=attn, ffn=nn.MLP(embed_dim=16, mlp_dim=32), norm="rmsnorm", norm_eps=1e-6)
    p = _init(nn.block.params(layer))
    assert set(p) == {"attention_norm", "attention", "mlp_norm", "mlp"}
    x = torch.randn(2, 5, 16)
    out, router_logits = nn.block.apply(layer, p, x)
    h = x + nn.attention.apply(attn, p["attention"], nn.norm.apply(p["attention_norm"], x, eps=1e-6))
    h = h + nn.mlp.apply(layer.ffn, p["mlp"], nn.norm.apply(p["mlp_norm"], h, eps=1e-6))
    assert router_logits is None
    torch.testing.assert_close(out, h)


def test_wrong_embed_size_is_a_type_check_error():
    from beartype.roar import BeartypeCallHintViolation

    p = _init(nn.linear.params(16, 8, axes=("mlp", "embed")))
    with pytest.raises((TypeCheckError, BeartypeCallHintViolation)):
        nn.linear.apply(p, torch.randn(2, 3, 12))  # the weight expects 16 input features
    layer = nn.Attention(embed_dim=16, n_heads=4)
    p = _init(nn.attention.params(layer))
    with pytest.raises((TypeCheckError, BeartypeCallHintViolation)):
        nn.attention.apply(layer, p, torch.randn(2, 3))  # rank 2, not [batch, seq, embed]
