"""FP8 projections (``kernels.matmul="fp8"``, fastllm/kernels/fp8.py): the op against a reference
written here from the recipe (per-tensor scales, e4m3 forward, e5m2 output gradient), the
``_scaled_mm`` operand layouts against the emulation, and the model's projections all taking it."""

import importlib

import pytest
import torch

from fastllm import models, random
from fastllm.kernels import KernelConfig, fp8_linear

FP8 = importlib.import_module("fastllm.kernels.fp8")
OPS = importlib.import_module("fastllm.nn.ops")


def _through(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` scaled so its amax is ``dtype``'s largest finite value, rounded to ``dtype`` and scaled back."""
    scale = torch.finfo(dtype).max / x.abs().max()
    return (x * scale).to(dtype).float() / scale


def _operands(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 64, generator=gen)
    w = torch.randn(32, 64, generator=gen) * 0.02
    dy = torch.randn(48, 32, generator=gen) * 1e-3
    return x, w, dy


def test_forward_and_gradients_equal_the_recipe():
    x, w, dy = _operands()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(xr, wr)
    y.backward(dy)
    xq, wq, dyq = _through(x, torch.float8_e4m3fn), _through(w, torch.float8_e4m3fn), _through(dy, torch.float8_e5m2)
    torch.testing.assert_close(y, xq @ wq.t(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xr.grad, dyq @ wq, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(wr.grad, dyq.t() @ xq, rtol=1e-5, atol=1e-8)


def test_fp8_rounds_and_keeps_dtypes():
    """Not a matmul in the input's precision (the rounding shows), but within FP8's few percent; the
    output and gradients keep their operands' dtypes."""
    x, w, dy = _operands(1)
    xb, wb = x.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    y = fp8_linear(xb, wb)
    y.backward(dy.bfloat16())
    assert y.dtype == xb.grad.dtype == wb.grad.dtype == torch.bfloat16
    exact = x @ w.t()
    error = ((y.float() - exact).norm() / exact.norm()).item()
    assert 1e-3 < error < 0.05, error


def test_quantize_fills_the_range_and_survives_zeros():
    x = torch.tensor([[0.5, -2.0], [1e-3, 0.0]])
    q, inverse = FP8.quantize(x, torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn and q.float().abs().max() == 448.0
    torch.testing.assert_close(q.float() * inverse, x, rtol=2 ** -3, atol=1e-4)
    q, inverse = FP8.quantize(torch.zeros(4, 4), torch.float8_e5m2)
    assert torch.isfinite(inverse) and q.float().abs().max() == 0


@pytest.mark.parametrize("layout", ["forward", "input_gradient", "weight_gradient"])
def test_scaled_mm_operand_layouts_equal_the_emulation(layout, monkeypatch):
    """The three products of a step, in the layouts they arrive in, through ``torch._scaled_mm``
    (CPU builds have one) against the same scaled product in fp32, each operand in the layout
    cuBLAS requires (``a`` row-major, ``b`` column-major)."""
    x, w, dy = (t * 16 for t in _operands(2))
    x8, xi = FP8.quantize(x, FP8.E4M3)
    w8, wi = FP8.quantize(w, FP8.E4M3)
    dy8, dyi = FP8.quantize(dy, FP8.E5M2)
    a, ai, b, bi = {"forward": (x8, xi, w8.t(), wi), "input_gradient": (dy8, dyi, w8, wi),
                    "weight_gradient": (dy8.t(), dyi, x8, xi)}[layout]
    one = torch.ones((), dtype=torch.float32)
    try:  # the layouts cuBLAS takes, so that only a build without the op skips
        torch._scaled_mm(x8[:16, :16].contiguous(), w8[:16, :16].t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"this build has no _scaled_mm: {error}")
    scaled_mm = torch._scaled_mm

    def cublas_contract(a, b, **kwargs):  # CPU's op takes any layout; cuBLAS takes only this one
        assert a.stride(1) == 1 and b.stride(0) == 1, (a.stride(), b.stride())
        return scaled_mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", cublas_contract)
    native = FP8._scaled(a, ai, b, bi, torch.float32)
    torch.testing.assert_close(native, (a.float() * ai) @ (b.float() * bi), rtol=1e-5, atol=1e-5)


def test_native_path_only_where_fp8_tensor_cores_are():
    a, b = torch.zeros(32, 32, dtype=FP8.E4M3), torch.zeros(32, 32, dtype=FP8.E4M3)
    assert not FP8._native(a, b)  # CPU: emulated (its _scaled_mm is hundreds of times slower)


def test_bad_shapes_and_choices_name_the_problem():
    # under FASTLLM_TYPECHECK the shape annotations reject it first; both messages name the op
    with pytest.raises((ValueError, TypeError), match="fp8_linear"):
        fp8_linear(torch.zeros(4, 8), torch.zeros(3, 5))
    with pytest.raises((ValueError, TypeError), match="matmul"):
        KernelConfig(matmul="fp4")
    assert KernelConfig.all("torch").matmul == "compute"


def test_every_projection_of_the_model_takes_fp8(monkeypatch):
    """q, k, v, o and the MLP's up, gate and down of every layer; the LM head stays as it is. The
    loss moves by FP8's rounding, not more."""
    calls = []

    def counted(x, w):
        calls.append(tuple(w.shape))
        return fp8_linear(x, w)

    monkeypatch.setattr(OPS, "fp8_linear", counted)
    config = models.preset("tiny-llama")
    params = models.init(config, random.key(0))
    gen = torch.Generator().manual_seed(0)
    batch = {"tokens": torch.randint(0, config.vocab_size, (2, 16), generator=gen),
             "targets": torch.randint(0, config.vocab_size, (2, 16), generator=gen)}
    plain, _ = models.loss(config, params, batch)
    assert not calls
    fp8, _ = models.loss(config.replace(kernels=KernelConfig(matmul="fp8")), params, batch)
    assert len(calls) == 7 * config.n_layers, calls
    assert (config.vocab_size, config.embed_dim) not in calls
    assert 1e-6 < abs(fp8.item() - plain.item()) < 0.02 * plain.item()
