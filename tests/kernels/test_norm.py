import pytest
import torch

from fastllm import nn
from fastllm.kernels import layer_norm, rms_norm
from helpers import compare

SHAPES = [(3, 8), (2, 5, 37), (4, 130)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(shape, dtype):
    x, scale = torch.randn(shape).to(dtype), (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    compare(lambda x, s, impl: rms_norm(x, s, 1e-6, impl=impl), (x, scale), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_matches_reference(shape, dtype):
    x = (3 + torch.randn(shape)).to(dtype)
    scale, bias = (1 + 0.1 * torch.randn(shape[-1])).to(dtype), torch.randn(shape[-1]).to(dtype)
    if dtype == torch.float32:
        compare(lambda x, s, b, impl: layer_norm(x, s, b, 1e-5, impl=impl), (x, scale, bias), dtype)
        return
    # bf16: the bf16 reference itself rounds dx/dscale/dbias by up to ~0.05 (one bf16 step near 4),
    # so compare both with the float64 result: the kernel may be off by at most one more bf16 step.
    dy = torch.randn(shape).to(dtype)
    results = {}
    for impl, as_type in (("triton", dtype), ("torch", dtype), ("exact", torch.float64)):
        leaves = [t.to(as_type).requires_grad_() for t in (x, scale, bias)]
        out = layer_norm(*leaves, 1e-5, impl="torch" if impl == "exact" else impl)
        results[impl] = (out, *torch.autograd.grad(out, leaves, dy.to(as_type)))
    for got, ref, exact in zip(results["triton"], results["torch"], results["exact"]):
        kernel_error = (got.double() - exact).abs().max()
        reference_error = (ref.double() - exact).abs().max()
        one_step = 2.0**-7 * exact.abs().max()  # one bf16 rounding step at the largest value
        assert kernel_error <= reference_error + one_step, (kernel_error, reference_error, one_step)


def test_references_equal_the_nn_layers():
    x, s, b = torch.randn(3, 37), torch.randn(37), torch.randn(37)
    torch.testing.assert_close(rms_norm(x, s, 1e-6, impl="torch"), nn.norm.rms_norm(x, s, 1e-6))
    torch.testing.assert_close(layer_norm(x, s, b, 1e-5, impl="torch"), nn.norm.layer_norm(x, s, b, 1e-5))


def test_gradcheck_float64():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    s = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, s: rms_norm(x, s, 1e-6, impl="triton"), (x, s))
    assert torch.autograd.gradcheck(lambda x, s, b: layer_norm(x, s, b, 1e-5, impl="triton"), (x, s, b))


def test_works_under_torch_func_grad():
    x, s = torch.randn(4, 9), torch.randn(9)
    grad = torch.func.grad(lambda s: rms_norm(x, s, 1e-6, impl="triton").square().sum())(s)
    want = torch.func.grad(lambda s: rms_norm(x, s, 1e-6, impl="torch").square().sum())(s)
    torch.testing.assert_close(grad, want)


@pytest.mark.parametrize("rms", [True, False])
def test_multi_row_tiles_and_partial_slices(rms):
    """Tiles of several rows, a last tile and a last program slice that are cut short."""
    from fastllm.kernels import norm

    x, s, b, dy = torch.randn(37, 100), torch.randn(100), torch.randn(100), torch.randn(37, 100)
    leaves = [t.clone().requires_grad_() for t in (x, s, b)]
    ref = norm.rms_norm_reference(*leaves[:2], 1e-5) if rms else norm.layer_norm_reference(*leaves, 1e-5)
    want = torch.autograd.grad(ref, leaves[:2] if rms else leaves, dy)
    for rows in (2, 4):
        y, mean, rstd = norm._forward(x, s, None if rms else b, 1e-5, rms, rows_per_program=rows, num_warps=4)
        torch.testing.assert_close(y, ref.detach(), rtol=1e-4, atol=1e-5)
        got = norm._backward(dy, x, s, mean, rstd, has_bias=not rms, rms=rms, tile_rows=rows)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
