import pytest
import torch

from fastllm import nn, random
from fastllm.kernels import grouped_matmul, make_routing, moe_combine, moe_dispatch, moe_experts
from helpers import TOLERANCE, compare

BF16_MATMUL = dict(rtol=5e-2, atol=1e-1)  # bf16 outputs of K-long dot products


def _offsets(counts):
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts).cumsum(0)
    return offsets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts,d_in,d_out", [([5, 0, 17, 3], 24, 40), ([1, 33], 20, 17)])
def test_grouped_matmul_matches_reference(dtype, counts, d_in, d_out):
    x = torch.randn(sum(counts), d_in).to(dtype)
    w = torch.randn(len(counts), d_out, d_in).to(dtype)
    tol = BF16_MATMUL if dtype == torch.bfloat16 else TOLERANCE[dtype]
    compare(lambda x, w, impl: grouped_matmul(x, w, _offsets(counts), impl=impl), (x, w), dtype, tol)


def test_grouped_matmul_gradcheck_float64():
    x = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 16, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: grouped_matmul(x, w, _offsets([2, 0, 5]), impl="triton"), (x, w), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_and_combine_match_reference(dtype):
    tokens, k, experts, embed = 11, 2, 5, 37
    routing = make_routing(torch.rand(tokens, experts).topk(k, dim=-1).indices, experts)
    x = torch.randn(tokens, embed).to(dtype)
    compare(lambda x, impl: moe_dispatch(x, routing, impl=impl), (x,), dtype)
    ys, weights = torch.randn(tokens * k, embed).to(dtype), torch.rand(tokens, k)
    compare(lambda ys, w, impl: moe_combine(ys, w, routing, impl=impl), (ys, weights), dtype)


def test_dispatch_combine_gradcheck_float64():
    tokens, k, experts = 6, 2, 3
    routing = make_routing(torch.rand(tokens, experts).topk(k, dim=-1).indices, experts)
    x = torch.randn(tokens, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(tokens, k, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w: moe_combine(moe_dispatch(x, routing, impl="triton") * 2, w, routing, impl="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_equal_the_nn_moe_layer(dtype):
    layer = nn.MoE(embed_dim=24, mlp_dim=40, n_experts=5, top_k=2)
    params = {n: (p * 20).to(dtype).requires_grad_() for n, p in
              nn.init(nn.moe.params(layer), random.key(0)).items()}
    x = torch.randn(13, 24).to(dtype).requires_grad_()
    want, router_logits = nn.moe.apply(layer, params, x)
    weights, experts = nn.moe.route(layer, router_logits)
    got = moe_experts(x, weights, experts, params["w_gate"], params["w_up"], params["w_down"], impl="triton")
    tol = dict(rtol=5e-2, atol=2.5e-1) if dtype == torch.bfloat16 else TOLERANCE[dtype]
    torch.testing.assert_close(got, want, **tol)
    cotangent = torch.randn_like(want)
    leaves = (x, *params.values())
    got_grads = torch.autograd.grad(got, leaves, cotangent, retain_graph=True)
    want_grads = torch.autograd.grad(want, leaves, cotangent)
    for name, g, w in zip(("x", *params), got_grads, want_grads):
        scale = w.abs().max().item()
        torch.testing.assert_close(g / scale, w / scale, **tol, msg=name)


def test_gather_several_rows_per_program(monkeypatch):
    from fastllm.kernels import make_routing, moe_combine, moe_dispatch
    import sys
    moe_module = sys.modules["fastllm.kernels.moe"]
    monkeypatch.setattr(moe_module, "_GATHER_ROWS", 4)  # 26 rows: the last tile is cut short
    gen = torch.Generator().manual_seed(3)
    routing = make_routing(torch.rand(13, 4, generator=gen).topk(2, dim=-1).indices, 4)
    x = torch.randn(13, 40, generator=gen)
    assert torch.equal(moe_dispatch(x, routing, impl="triton"), moe_module.moe_dispatch_reference(x, routing))
    ys, w = torch.randn(26, 40, generator=gen), torch.rand(13, 2, generator=gen)
    torch.testing.assert_close(moe_combine(ys, w, routing, impl="triton"),
                               moe_module.moe_combine_reference(ys, w, routing))
