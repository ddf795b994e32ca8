import pytest
import torch

from fastllm import nn
from fastllm.kernels import layer_norm, rms_norm
from helpers import assert_caught, check, compare, planted

SHAPES = [(3, 8), (2, 5, 37), (4, 130)]


def _rms(x, s, impl):
    return rms_norm(x, s, 1e-6, impl=impl)


def _layer(x, s, b, impl):
    return layer_norm(x, s, b, 1e-5, impl=impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(shape, dtype, gen):
    x, scale = torch.randn(shape, generator=gen), 1 + 0.1 * torch.randn(shape[-1], generator=gen)
    # bf16: the normalised row is rounded before the scale (as transformers does), and a last-bit
    # difference in rstd may flip that rounding: two roundings that may land a step apart
    compare(_rms, (x, scale), dtype, bf16_steps=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_matches_reference(shape, dtype, gen):
    x = 3 + torch.randn(shape, generator=gen)  # a mean far from 0: the centring must be exact
    scale, bias = 1 + 0.1 * torch.randn(shape[-1], generator=gen), torch.randn(shape[-1], generator=gen)
    compare(_layer, (x, scale, bias), dtype)


def test_planted_eps_is_caught(gen):
    """RMSNorm with eps 1e-4 for 1e-6 moves outputs by ~5e-5 relative: the fp32 check must see it."""
    x, scale = torch.randn(4, 130, generator=gen), 1 + 0.1 * torch.randn(130, generator=gen)
    assert_caught(planted(_rms, lambda x, s, impl: rms_norm(x, s, 1e-4, impl=impl)), (x, scale), torch.float32)


def test_references_equal_the_nn_layers(gen):
    x, s, b = (torch.randn(shape, generator=gen) for shape in ((3, 37), (37,), (37,)))
    torch.testing.assert_close(rms_norm(x, s, 1e-6, impl="torch"), nn.norm.rms_norm(x, s, 1e-6))
    torch.testing.assert_close(layer_norm(x, s, b, 1e-5, impl="torch"), nn.norm.layer_norm(x, s, b, 1e-5))


def test_float64_equals_reference_and_gradcheck(gen):
    """In fp64 the kernels compute in fp64: equal to the reference but for the order of sums.
    gradcheck adds its own checks (finite differences, undefined output gradients)."""
    x, s, b = (torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((3, 7), (7,), (7,)))
    compare(_rms, (x, s), torch.float64)
    compare(_layer, (x, s, b), torch.float64)
    x, s, b = (t.requires_grad_() for t in (x, s, b))
    assert torch.autograd.gradcheck(lambda x, s: _rms(x, s, impl="triton"), (x, s))
    assert torch.autograd.gradcheck(lambda x, s, b: _layer(x, s, b, impl="triton"), (x, s, b))


def test_works_under_torch_func_grad(gen):
    x, s = torch.randn(4, 9, generator=gen), torch.randn(9, generator=gen)
    grad = torch.func.grad(lambda s: rms_norm(x, s, 1e-6, impl="triton").square().sum())(s)
    want = torch.func.grad(lambda s: rms_norm(x.double(), s, 1e-6, impl="torch").square().sum())(s.double())
    check(grad, want, what="dscale under torch.func.grad")


@pytest.mark.parametrize("rms", [True, False])
def test_multi_row_tiles_and_partial_slices(rms, gen):
    """Tiles of several rows, a last tile and a last program slice that are cut short."""
    from fastllm.kernels import norm

    x, s, b, dy = (torch.randn(shape, generator=gen) for shape in ((37, 100), (100,), (100,), (37, 100)))
    leaves = [t.double().requires_grad_() for t in (x, s, b)]
    ref = norm.rms_norm_reference(*leaves[:2], 1e-5) if rms else norm.layer_norm_reference(*leaves, 1e-5)
    want = torch.autograd.grad(ref, leaves[:2] if rms else leaves, dy.double())
    for rows in (2, 4):
        y, mean, rstd = norm._forward(x, s, None if rms else b, 1e-5, rms, rows_per_program=rows, num_warps=4)
        check(y, ref.detach(), what=f"y, {rows} rows a tile")
        got = norm._backward(dy, x, s, mean, rstd, has_bias=not rms, rms=rms, tile_rows=rows)
        for name, g, w in zip(("dx", "dscale", "dbias"), got, want):
            check(g, w, what=f"{name}, {rows} rows a tile")
