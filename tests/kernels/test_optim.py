import pytest
import torch

from fastllm.kernels import adamw_step, global_norm
from helpers import check

SHAPES = [(3, 5), (70000,), (17,)]  # one tensor spans two chunks
HYPER = dict(lr=1e-2, weight_decay=0.1, step=3)


def _state(param_dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    master = [torch.randn(s, generator=gen) for s in SHAPES]
    params = [m.to(param_dtype) for m in master]
    grads = [torch.randn(s, generator=gen).to(param_dtype) for s in SHAPES]
    exp_avgs = [0.1 * torch.randn(s, generator=gen) for s in SHAPES]
    exp_avg_sqs = [0.1 * torch.rand(s, generator=gen) for s in SHAPES]
    return params, grads, exp_avgs, exp_avg_sqs, master


def _kernel_step(param_dtype, impl="triton", **hyper):
    """(params, master, exp_avgs, exp_avg_sqs) after one step from ``_state(param_dtype)``."""
    params, grads, m, v, master = _state(param_dtype)
    master = None if param_dtype == torch.float32 else master
    adamw_step(params, grads, m, v, master, **{**HYPER, **hyper}, grad_scale=torch.tensor(0.5), impl=impl)
    return params, params if master is None else master, m, v


def _exact_step(param_dtype):
    """The same step in float64 from the same state (the gradients as rounded to ``param_dtype``),
    with the reference's maths and the fp32 hyperparameters it derives."""
    _, grads, m, v, master = (list(map(torch.Tensor.double, part)) for part in _state(param_dtype))
    adamw_step(master, grads, m, v, None, **HYPER, grad_scale=torch.tensor(0.5), impl="torch")
    return master, m, v


def _check_step(step, param_dtype):
    params, master, m, v = step
    for name, got, want in zip(("master", "exp_avg", "exp_avg_sq"), (master, m, v), _exact_step(param_dtype)):
        for i, (g, w) in enumerate(zip(got, want)):
            check(g, w, what=f"{name} {i}")
    for p, w in zip(params, master):  # the model copy: the master rounded once, less than a step away
        # (not torch.equal to w.to(bf16): Triton's interpreter truncates, compiled kernels round to nearest)
        assert p.dtype == param_dtype
        assert ((p.float() - w).abs() <= torch.finfo(param_dtype).eps * w.abs()).all()


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_adamw_matches_reference(param_dtype):
    _check_step(_kernel_step(param_dtype), param_dtype)


def test_adamw_reference_matches_float64():
    """The torch path is what "auto" runs on CPU: it too holds to the fp32 tolerance."""
    _check_step(_kernel_step(torch.float32, impl="torch"), torch.float32)


def test_planted_bias_correction_is_caught():
    """Bias corrections of the step before (the counter read before its increment)."""
    with pytest.raises(AssertionError, match="not close"):
        _check_step(_kernel_step(torch.float32, step=HYPER["step"] - 1), torch.float32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_adamw_takes_lr_and_step_as_device_tensors(impl):
    """A scheduled lr (float64 0-d) and the optimizer's int64 step counter: same result as numbers."""
    numbers, tensors = _state(torch.float32), _state(torch.float32)
    adamw_step(*numbers[:4], lr=3e-3, weight_decay=0.1, step=7, grad_scale=0.5, impl=impl)
    adamw_step(*tensors[:4], lr=torch.tensor(3e-3, dtype=torch.float64), weight_decay=0.1,
               step=torch.tensor(7), grad_scale=torch.tensor(0.5), impl=impl)
    for got, want in zip(tensors[:4], numbers[:4]):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert not torch.equal(tensors[0][0], _state(torch.float32)[0][0])  # the step did move them


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_adamw_apply_false_leaves_every_tensor_as_it_was(impl):
    """A skipped step (a NaN gradient): params, master and moments keep their bits; ``apply`` True
    is the ungated step bit for bit."""
    for param_dtype in (torch.float32, torch.bfloat16):
        kept = _state(param_dtype)
        kept[1][0][0] = float("nan")  # the discarded update's NaNs must not leak through
        before = [[t.clone() for t in role] for role in kept]
        master = None if param_dtype == torch.float32 else kept[4]
        adamw_step(*kept[:4], master, **HYPER, apply=torch.tensor(False), impl=impl)
        for role, old in zip(kept[:1] + kept[2:], before[:1] + before[2:]):  # all but the gradients
            assert all(torch.equal(t, o) for t, o in zip(role, old))
    gated, plain = _state(torch.float32), _state(torch.float32)
    adamw_step(*gated[:4], **HYPER, apply=torch.tensor(True), impl=impl)
    adamw_step(*plain[:4], **HYPER, impl=impl)
    assert all(torch.equal(g, w) for role_g, role_w in zip(gated, plain) for g, w in zip(role_g, role_w))


def test_adamw_equals_torch_optim():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(10, generator=gen, requires_grad=True)
    q, m, v = p.detach().clone(), torch.zeros(10), torch.zeros(10)
    opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1)
    for step in range(1, 4):
        g = torch.randn(10, generator=gen)
        p.grad = g.clone()
        opt.step()
        adamw_step([q], [g], [m], [v], lr=1e-2, weight_decay=0.1, step=step, impl="triton")
    torch.testing.assert_close(q, p.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_global_norm(dtype):
    """Accumulated in fp32 whatever the inputs: the fp32 tolerance against the norm in float64."""
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    exact = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in tensors]))
    check(global_norm(tensors, impl="triton"), exact, what="triton")
    check(global_norm(tensors, impl="torch"), exact, what="torch")


def test_planted_norm_of_one_tensor_short_is_caught():
    """A norm that misses the last tensor (a table built one entry short)."""
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.randn(s, generator=gen) for s in SHAPES]
    exact = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in tensors]))
    with pytest.raises(AssertionError, match="not close"):
        check(global_norm(tensors[:-1], impl="triton"), exact)


def test_mixed_dtypes_are_refused():
    with pytest.raises(ValueError, match="one dtype"):
        global_norm([torch.ones(3), torch.ones(3, dtype=torch.bfloat16)], impl="triton")
