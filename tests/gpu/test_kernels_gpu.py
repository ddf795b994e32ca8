"""The compiled Triton kernels on CUDA against their references in float64, forward and backward.

The same comparison as tests/kernels (helpers.compare), at shapes where the GPU launch choices
matter: 4096-wide norm rows, several programs per SM in the norm backward, grouped-matmul tiles of
128 rows with a K loop, MoE rows wider than one 4096 block, AdamW tensors of several 64K chunks.
bf16 runs the 16-bit ``tl.dot`` of the grouped matmul, which the interpreter cannot.
"""

import importlib

import pytest
import torch

from fastllm.kernels import (ACTIVATIONS, _triton, adamw_step, apply_rotary, cast, fused_linear_cross_entropy, gated,
                             global_norm, grouped_matmul, layer_norm, make_routing, moe_combine, moe_dispatch,
                             moe_experts, rms_norm, sum_rows)
from helpers import Constant, assert_caught, check, compare, planted

GROUPED_MATMUL = importlib.import_module("fastllm.kernels.grouped_matmul")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _randn(gen, device, *shape, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(64, 4096), (2000, 384)], ids=["64x4096", "2000x384"])
def test_norms(rows, width, dtype, gen, device):
    x, bias = _randn(gen, device, rows, width) + 3, _randn(gen, device, width)
    scale = 1 + _randn(gen, device, width, scale=0.1)
    compare(lambda x, s, impl: rms_norm(x, s, 1e-6, impl=impl), (x, scale), dtype, bf16_steps=2)  # two roundings
    compare(lambda x, s, b, impl: layer_norm(x, s, b, 1e-5, impl=impl), (x, scale, bias), dtype)


def test_planted_eps_is_caught_on_the_gpu(gen, device):
    x, scale = _randn(gen, device, 64, 4096), 1 + _randn(gen, device, 4096, scale=0.1)
    right = lambda x, s, impl: rms_norm(x, s, 1e-6, impl=impl)  # noqa: E731
    assert_caught(planted(right, lambda x, s, impl: rms_norm(x, s, 1e-4, impl=impl)), (x, scale), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary(dtype, gen, device):
    from fastllm import nn

    q = _randn(gen, device, 2, 300, 8, 64).transpose(1, 2)  # the projections' [b, h, s, d] view
    k = _randn(gen, device, 2, 4, 300, 64)
    positions = torch.randint(0, 4096, (2, 300), generator=gen).to(device)
    cos, sin = nn.rotary.cos_sin(nn.Rotary(head_dim=64, fraction=0.5), positions, dtype=torch.float64)
    compare(lambda q, k, c, s, impl: apply_rotary(q, k, c, s, impl=impl), (q, k, Constant(cos), Constant(sin)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_gated_activations(name, dtype, gen, device):
    gate, up = _randn(gen, device, 300, 1100), _randn(gen, device, 300, 1100)
    for recompute in (True, False):
        compare(lambda g, u, impl: gated(g, u, name, recompute=recompute, impl=impl), (gate, up), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_cross_entropy(dtype, gen, device):
    hidden, weight = _randn(gen, device, 4, 256, 128), _randn(gen, device, 5003, 128, scale=0.1)
    targets = torch.randint(0, 5003, (4, 256), generator=gen)
    targets[0, :17] = -100
    fn = lambda h, w, impl: fused_linear_cross_entropy(  # noqa: E731
        h, w, targets.to(device), z_loss=1e-3, label_smoothing=0.1, chunk_size=384, impl=impl)
    compare(fn, (hidden, weight), dtype)


def _recording_upcast(monkeypatch) -> list:
    """The UPCAST flag of every grouped-matmul launch (forward and weight gradient)."""
    flags, launch = [], _triton.launch

    def record(kernel, *args, **meta):
        if "UPCAST" in meta:
            flags.append(meta["UPCAST"])
        return launch(kernel, *args, **meta)

    monkeypatch.setattr(_triton, "launch", record)
    return flags


@pytest.mark.cuda_only("the interpreter multiplies 16-bit tiles wrongly in tl.dot")
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_matmul_runs_the_16_bit_dot_on_cuda(dtype, gen, device, monkeypatch):
    counts = [130, 0, 257, 3, 64]  # full and partial 128-row tiles, an empty group
    x, w = _randn(gen, device, sum(counts), 192), _randn(gen, device, len(counts), 320, 192, scale=0.1)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], device=device)
    monkeypatch.setattr(GROUPED_MATMUL, "_vendor", lambda x, w: False)  # the Triton kernel (bf16 on Hopper: below)
    flags = _recording_upcast(monkeypatch)
    compare(lambda x, w, impl: grouped_matmul(x, w, offsets, impl=impl), (x, w), dtype)
    assert not GROUPED_MATMUL.upcast_tiles(x.device)  # the decision, and what the launches did with it:
    assert flags and not any(flags), f"UPCAST flags of the launches: {flags}"  # tiles fed to tl.dot as they are


@pytest.mark.cuda_only("torch._grouped_mm's CUDA kernels")
def test_grouped_matmul_bf16_on_hopper_is_torch_grouped_mm(gen, device):
    """bf16 on compute capability 9.x takes ``torch._grouped_mm`` (faster there), which must equal
    the float64 reference as the Triton kernel does, forward and both gradients."""
    if torch.cuda.get_device_capability(device)[0] != 9:
        pytest.skip("torch._grouped_mm is taken on compute capability 9.x only")
    counts = [130, 0, 257, 3, 64]
    x, w = _randn(gen, device, sum(counts), 192), _randn(gen, device, len(counts), 320, 192, scale=0.1)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], device=device)
    assert GROUPED_MATMUL._vendor(x.bfloat16(), w.bfloat16())
    y = grouped_matmul(x.bfloat16().requires_grad_(), w.bfloat16(), offsets, impl="triton")
    assert "GroupedMm" in type(y.grad_fn).__name__, y.grad_fn
    compare(lambda x, w, impl: grouped_matmul(x, w, offsets, impl=impl), (x, w), torch.bfloat16)


@pytest.mark.cuda_only("FP8 tensor cores")
def test_fp8_linear_takes_scaled_mm_and_equals_the_emulation(gen, device):
    """On compute capability 8.9+ ``fp8_linear`` runs ``torch._scaled_mm``; its output and both
    gradients equal the emulated product (operands rounded through FP8, fp32 product) to within
    the bf16 rounding of the results."""
    fp8 = importlib.import_module("fastllm.kernels.fp8")
    if torch.cuda.get_device_capability(device) < (8, 9):
        pytest.skip("no FP8 tensor cores")
    x = _randn(gen, device, 256, 512).bfloat16()
    w = _randn(gen, device, 384, 512, scale=0.02).bfloat16()
    dy = _randn(gen, device, 256, 384).bfloat16()
    assert fp8._native(x, w.t())
    results = {}
    for where in ("cuda", "cpu"):  # the CPU takes the emulation
        xs, ws = x.to(where).requires_grad_(), w.to(where).requires_grad_()
        y = fp8.fp8_linear(xs, ws)
        results[where] = [t.float().cpu() for t in (y, *torch.autograd.grad(y, (xs, ws), dy.to(where)))]
    for got, want in zip(results["cuda"], results["cpu"]):
        assert ((got - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_dispatch_combine_and_experts(dtype, gen, device):
    tokens, experts, k = 300, 8, 2
    chosen = torch.rand(tokens, experts, generator=gen).topk(k, dim=-1).indices.to(device)
    routing = make_routing(chosen, experts)
    compare(lambda x, impl: moe_dispatch(x, routing, impl=impl), (_randn(gen, device, tokens, 4100),), dtype)
    ys, weights = _randn(gen, device, tokens * k, 4100), torch.rand(tokens, k, generator=gen).to(device)
    compare(lambda ys, w, impl: moe_combine(ys, w, routing, impl=impl), (ys, weights), dtype)
    x, wts = _randn(gen, device, tokens, 256), weights / weights.sum(-1, keepdim=True)
    w_gate, w_up = (_randn(gen, device, experts, 512, 256, scale=256**-0.5) for _ in range(2))
    w_down = _randn(gen, device, experts, 256, 512, scale=512**-0.5)
    compare(lambda x, wts, wg, wu, wd, impl: moe_experts(x, wts, chosen, wg, wu, wd, impl=impl),
            (x, wts, w_gate, w_up, w_down), dtype, bf16_steps=2)  # a rounding after each stage


def _adamw_state(gen, device, param_dtype):
    """fp32 master, moments and gradients in ``param_dtype``: several 64K chunks, a partial last one."""
    shapes = [(3, 5), (200003,), (4096, 17)]
    master = [_randn(gen, device, *s).float() for s in shapes]
    grads = [_randn(gen, device, *s).to(param_dtype) for s in shapes]
    exp_avgs = [_randn(gen, device, *s, scale=0.1).float() for s in shapes]
    exp_avg_sqs = [_randn(gen, device, *s, scale=0.1).abs().float() for s in shapes]
    return master, grads, exp_avgs, exp_avg_sqs


@pytest.mark.parametrize("param_dtype", DTYPES)
def test_adamw_and_global_norm(param_dtype, gen, device):
    master, grads, m, v = _adamw_state(gen, device, param_dtype)
    exact = [[t.double() for t in part] for part in (master, grads, m, v)]
    params = [w.to(param_dtype) for w in master]
    own_master = None if param_dtype == torch.float32 else master
    hyper = dict(lr=1e-2, weight_decay=0.1, step=torch.tensor(3, device=device),
                 grad_scale=torch.tensor(0.5, device=device))
    adamw_step(params, grads, m, v, own_master, **hyper, impl="triton")
    adamw_step(*exact, None, **hyper, impl="torch")
    for name, got, want in zip(("master", "exp_avg", "exp_avg_sq"), (own_master or params, m, v),
                               (exact[0], exact[2], exact[3])):
        for i, (g, w) in enumerate(zip(got, want)):
            check(g, w, what=f"{name} {i}")
    for p, w in zip(params, own_master or params):
        if device.type == "cuda":  # compiled kernels round to nearest, as torch does
            assert torch.equal(p, w.to(param_dtype))
        else:  # the interpreter (a dry run) truncates: within a step
            assert ((p.float() - w).abs() <= torch.finfo(param_dtype).eps * w.abs()).all()
    exact_norm = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))
    check(global_norm(grads, impl="triton"), exact_norm, what="global norm")


def test_cast_and_sum_rows_are_exact(gen, device):
    x = _randn(gen, device, 3, 1 << 20, scale=100).to(torch.bfloat16)
    assert torch.equal(cast(x, torch.float32, impl="triton"), x.float())
    expected = x[0].float() + x[1].float() + x[2].float()
    assert torch.equal(sum_rows(x, torch.float32, impl="triton"), expected)
