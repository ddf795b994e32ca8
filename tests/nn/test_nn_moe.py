"""Mixture of experts against transformers' Mixtral block and auxiliary-loss function."""

import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

from fastllm import nn, random

LAYER = nn.MoE(embed_dim=16, mlp_dim=24, n_experts=4, top_k=2)


def _params(seed=0):
    return nn.init(nn.moe.params(LAYER), random.key(seed))


def test_moe_axes_follow_the_contract():
    """The router's output is a score per expert that every token needs whole (``router``), apart
    from the experts' own dim, which a rule may spread over ranks."""
    axes = nn.axes(nn.moe.params(LAYER))
    assert axes == {
        "router": ("router", "embed"),
        "w_up": ("experts", "mlp", "embed"),
        "w_gate": ("experts", "mlp", "embed"),
        "w_down": ("experts", "embed", "mlp"),
    }


def test_moe_matches_transformers_mixtral_block():
    config = MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=4,
                           num_experts_per_tok=2, hidden_act="silu")
    block = MixtralSparseMoeBlock(config).eval()
    p = _params()
    with torch.no_grad():
        block.gate.weight.copy_(p["router"])
        block.experts.gate_up_proj.copy_(torch.cat((p["w_gate"], p["w_up"]), dim=1))
        block.experts.down_proj.copy_(p["w_down"])
    x = torch.randn(3, 5, 16)
    out, router_logits = nn.moe.apply(LAYER, p, x)
    torch.testing.assert_close(out, block(x), atol=1e-6, rtol=1e-5)
    assert router_logits.shape == (3, 5, 4)


def test_moe_equals_dense_loop_over_tokens():
    p = _params(1)
    x = torch.randn(7, 16)
    out, logits = nn.moe.apply(LAYER, p, x)
    probs = torch.softmax(logits.float(), -1)
    for t in range(7):
        weights, experts = probs[t].topk(2)
        weights = weights / weights.sum()
        expected = sum(
            w * (torch.nn.functional.silu(p["w_gate"][e] @ x[t]) * (p["w_up"][e] @ x[t])) @ p["w_down"][e].T
            for w, e in zip(weights, experts.tolist())
        )
        torch.testing.assert_close(out[t], expected, atol=1e-6, rtol=1e-5)


def test_unnormalised_top_k_keeps_softmax_weights():
    layer = nn.MoE(embed_dim=16, mlp_dim=24, n_experts=4, top_k=2, normalize_top_k=False)
    logits = torch.randn(5, 4)
    weights, _ = nn.moe.route(layer, logits)
    torch.testing.assert_close(weights, torch.softmax(logits, -1).topk(2).values)


def test_load_balancing_loss_matches_transformers():
    layers = tuple(torch.randn(20, 4) for _ in range(3))
    ours = nn.moe.load_balancing_loss(layers, n_experts=4, top_k=2)
    theirs = load_balancing_loss_func(layers, num_experts=4, top_k=2)
    torch.testing.assert_close(ours, theirs)


def test_router_z_loss_is_mean_squared_logsumexp():
    layers = [torch.randn(6, 4), torch.randn(6, 4)]
    expected = torch.cat(layers).logsumexp(-1).pow(2).mean()
    torch.testing.assert_close(nn.moe.router_z_loss(layers), expected)


def test_moe_top_k_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="top_k"):
        nn.MoE(embed_dim=8, mlp_dim=8, n_experts=2, top_k=3)


def _skewed_params(seed=2):
    """Every token with positive features picks experts 0 and 1 (their router rows point along them)."""
    p = _params(seed)
    p["router"] = torch.cat([torch.ones(2, 16), -torch.ones(2, 16)])
    return p


def _dense(p, x, experts, weights):
    """Each token through its experts one by one: the meaning of dropless."""
    rows = []
    for t in range(x.shape[0]):
        terms = [w * (torch.nn.functional.silu(p["w_gate"][e] @ x[t]) * (p["w_up"][e] @ x[t])) @ p["w_down"][e].T
                 for w, e in zip(weights[t], experts[t].tolist())]
        rows.append(sum(terms))
    return torch.stack(rows)


def test_skewed_routing_drops_nothing():
    p, x = _skewed_params(), torch.rand(9, 16) + 0.1
    out, logits = nn.moe.apply(LAYER, p, x)
    weights, experts = nn.moe.route(LAYER, logits)
    assert (experts.sort(-1).values == torch.tensor([0, 1])).all()  # every pick goes to experts 0 and 1
    torch.testing.assert_close(out, _dense(p, x, experts, weights), atol=1e-6, rtol=1e-5)


def test_capacity_drops_a_sequences_latest_picks_and_reports_them():
    """Capacity ceil(1.0 * 8 tokens * 2 / 4 experts) = 4 picks per expert and sequence: tokens 4-7 of
    each sequence lose both picks (zero output), half of all picks are dropped."""
    layer = nn.MoE(embed_dim=16, mlp_dim=24, n_experts=4, top_k=2, capacity_factor=1.0)
    p, x = _skewed_params(), torch.rand(2, 8, 16) + 0.1
    out, logits = nn.moe.apply(layer, p, x)
    weights, experts = nn.moe.route(layer, logits)
    kept = _dense(p, x[:, :4].reshape(-1, 16), experts[:, :4].reshape(-1, 2), weights[:, :4].reshape(-1, 2))
    torch.testing.assert_close(out[:, :4].reshape(-1, 16), kept, atol=1e-6, rtol=1e-5)
    assert torch.equal(out[:, 4:], torch.zeros_like(out[:, 4:]))
    stats = nn.moe.token_statistics(layer, logits)
    assert stats["moe_dropped"].tolist() == [[0.0] * 4 + [2.0] * 4] * 2
    aux = nn.moe.aux_losses(None, stats, n_experts=4, top_k=2, n_layers=1)
    assert aux["moe_dropped_fraction"].item() == 0.5
