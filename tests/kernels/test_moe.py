import importlib

import pytest
import torch

from fastllm import nn, random
from fastllm.kernels import grouped_matmul, make_routing, moe_combine, moe_dispatch, moe_experts
from helpers import assert_caught, check, compare, planted

# the modules, not the functions of the same names that fastllm.kernels re-exports
GROUPED_MATMUL = importlib.import_module("fastllm.kernels.grouped_matmul")
MOE = importlib.import_module("fastllm.kernels.moe")


def _offsets(counts):
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts).cumsum(0)
    return offsets


def _grouped(offsets):
    return lambda x, w, impl: grouped_matmul(x, w, offsets, impl=impl)


def _routing(gen, tokens, experts, k):
    return make_routing(torch.rand(tokens, experts, generator=gen).topk(k, dim=-1).indices, experts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts,d_in,d_out", [([5, 0, 17, 3], 24, 40), ([1, 33], 20, 17)])
def test_grouped_matmul_matches_reference(dtype, counts, d_in, d_out, gen):
    x = torch.randn(sum(counts), d_in, generator=gen)
    w = torch.randn(len(counts), d_out, d_in, generator=gen)
    compare(_grouped(_offsets(counts)), (x, w), dtype)


def test_planted_group_boundary_is_caught(gen):
    """The second group starting one row late (its first row multiplied by the first group's weight)."""
    x, w = torch.randn(25, 24, generator=gen), torch.randn(4, 40, 24, generator=gen)
    late = _offsets([5, 0, 17, 3])
    late[1:3] += 1
    assert_caught(planted(_grouped(_offsets([5, 0, 17, 3])), _grouped(late)), (x, w), torch.float32)


def test_vendor_grouped_matmul_equals_reference_with_gradients(monkeypatch, gen):
    """``torch._grouped_mm`` (what bf16 on Hopper runs) through ``grouped_matmul``, an empty group
    included: values and both gradients equal the loop over groups. CPU builds have the op too."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    assert not GROUPED_MATMUL._vendor(torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(2, 8, 8, dtype=torch.bfloat16))
    monkeypatch.setattr(GROUPED_MATMUL, "_vendor", lambda x, w: True)
    offsets = _offsets([5, 0, 17, 18])
    x = torch.randn(40, 32, generator=gen).bfloat16().requires_grad_()
    w = torch.randn(4, 48, 32, generator=gen).bfloat16().requires_grad_()
    dy = torch.randn(40, 48, generator=gen).bfloat16()
    got = grouped_matmul(x, w, offsets, impl="triton")
    assert "GroupedMm" in type(got.grad_fn).__name__, got.grad_fn  # torch's op, not the Triton kernel
    got_grads = torch.autograd.grad(got, (x, w), dy)
    want = GROUPED_MATMUL.grouped_matmul_reference(x, w, offsets)
    want_grads = torch.autograd.grad(want, (x, w), dy)
    for a, b in zip((got, *got_grads), (want, *want_grads)):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
    assert got_grads[1][1].abs().max() == 0  # the empty group's weight gets no gradient


def test_sixteen_bit_tiles_are_upcast_in_the_interpreter_only():
    """The bf16 tl.dot path is the one GPUs run (tests/gpu checks it); the interpreter gets it wrong."""
    assert GROUPED_MATMUL.upcast_tiles(torch.device("cpu"))
    assert not GROUPED_MATMUL.upcast_tiles(torch.device("cuda"))


def test_grouped_matmul_float64_equals_reference_and_gradcheck(gen):
    x = torch.randn(7, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 16, 16, generator=gen, dtype=torch.float64)
    compare(_grouped(_offsets([2, 0, 5])), (x, w), torch.float64)
    leaves = (x.requires_grad_(), w.requires_grad_())
    assert torch.autograd.gradcheck(lambda x, w: _grouped(_offsets([2, 0, 5]))(x, w, impl="triton"), leaves,
                                    fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_and_combine_match_reference(dtype, gen):
    tokens, k, experts, embed = 11, 2, 5, 37
    routing = _routing(gen, tokens, experts, k)
    x = torch.randn(tokens, embed, generator=gen)
    compare(lambda x, impl: moe_dispatch(x, routing, impl=impl), (x,), dtype)
    ys, weights = torch.randn(tokens * k, embed, generator=gen), torch.rand(tokens, k, generator=gen)
    compare(lambda ys, w, impl: moe_combine(ys, w, routing, impl=impl), (ys, weights), dtype)


def test_dispatch_combine_float64_equals_reference_and_gradcheck(gen):
    routing = _routing(gen, 6, 3, 2)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    w = torch.rand(6, 2, generator=gen, dtype=torch.float64)
    fn = lambda x, w, impl: moe_combine(moe_dispatch(x, routing, impl=impl) * 2, w, routing, impl=impl)  # noqa: E731
    compare(fn, (x, w), torch.float64)
    assert torch.autograd.gradcheck(lambda x, w: fn(x, w, impl="triton"), (x.requires_grad_(), w.requires_grad_()),
                                    fast_mode=True)


def _experts_inputs(gen, tokens=13, embed=24, mlp=40, n_experts=5, k=2):
    """x, routing weights, experts and the three expert weights, scaled so every stage is ~1."""
    x = torch.randn(tokens, embed, generator=gen)
    weights = torch.rand(tokens, k, generator=gen) + 0.1
    experts = torch.rand(tokens, n_experts, generator=gen).topk(k, dim=-1).indices
    w_gate, w_up = (torch.randn(n_experts, mlp, embed, generator=gen) * embed**-0.5 for _ in range(2))
    w_down = torch.randn(n_experts, embed, mlp, generator=gen) * mlp**-0.5
    return (x, weights / weights.sum(-1, keepdim=True), w_gate, w_up, w_down), experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_match_reference(dtype, gen):
    """The whole chain (dispatch, three grouped matmuls, SwiGLU, combine) and every gradient."""
    inputs, experts = _experts_inputs(gen)
    # bf16: the chain rounds after each stage (gate, up, hidden, down), so a step may differ in between
    compare(lambda x, wts, wg, wu, wd, impl: moe_experts(x, wts, experts, wg, wu, wd, impl=impl), inputs, dtype,
            bf16_steps=2)


def test_experts_reference_equals_the_nn_moe_layer(gen):
    layer = nn.MoE(embed_dim=24, mlp_dim=40, n_experts=5, top_k=2)
    params = {n: p * 20 for n, p in nn.init(nn.moe.params(layer), random.key(0)).items()}
    x = torch.randn(13, 24, generator=gen)
    want, router_logits = nn.moe.apply(layer, params, x)
    weights, experts = nn.moe.route(layer, router_logits)
    got = moe_experts(x, weights, experts, params["w_gate"], params["w_up"], params["w_down"], impl="torch")
    torch.testing.assert_close(got, want)


def test_gather_several_rows_per_program(monkeypatch, gen):
    monkeypatch.setattr(MOE, "_GATHER_ROWS", 4)  # 26 rows: the last tile is cut short
    routing = _routing(gen, 13, 4, 2)
    x = torch.randn(13, 40, generator=gen)
    assert torch.equal(moe_dispatch(x, routing, impl="triton"), MOE.moe_dispatch_reference(x, routing))
    ys, w = torch.randn(26, 40, generator=gen), torch.rand(13, 2, generator=gen)
    check(moe_combine(ys, w, routing, impl="triton"), MOE.moe_combine_reference(ys.double(), w.double(), routing))
