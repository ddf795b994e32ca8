import pytest
import torch

from fastllm.kernels import adamw_step, global_norm

SHAPES = [(3, 5), (70000,), (17,)]  # one tensor spans two chunks


def _state(param_dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    master = [torch.randn(s, generator=gen) for s in SHAPES]
    params = [m.to(param_dtype) for m in master]
    grads = [torch.randn(s, generator=gen).to(param_dtype) for s in SHAPES]
    exp_avgs = [0.1 * torch.randn(s, generator=gen) for s in SHAPES]
    exp_avg_sqs = [0.1 * torch.rand(s, generator=gen) for s in SHAPES]
    return params, grads, exp_avgs, exp_avg_sqs, master


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_adamw_matches_reference(param_dtype):
    states = {impl: _state(param_dtype) for impl in ("triton", "torch")}
    for impl, (params, grads, m, v, master) in states.items():
        adamw_step(params, grads, m, v, None if param_dtype == torch.float32 else master, lr=1e-2,
                   weight_decay=0.1, step=3, grad_scale=torch.tensor(0.5), impl=impl)
    tol = dict(rtol=1e-5, atol=1e-6)
    for got, want in zip(states["triton"], states["torch"]):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **(tol if g.dtype == torch.float32 else {}))


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


def test_adamw_equals_torch_optim():
    p = torch.randn(10, requires_grad=True)
    q, m, v = p.detach().clone(), torch.zeros(10), torch.zeros(10)
    opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1)
    for step in range(1, 4):
        g = torch.randn(10)
        p.grad = g.clone()
        opt.step()
        adamw_step([q], [g], [m], [v], lr=1e-2, weight_decay=0.1, step=step, impl="triton")
    torch.testing.assert_close(q, p.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_global_norm(dtype):
    tensors = [torch.randn(s).to(dtype) for s in SHAPES]
    want = torch.linalg.vector_norm(torch.cat([t.float().flatten() for t in tensors]))
    torch.testing.assert_close(global_norm(tensors, impl="triton"), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(global_norm(tensors, impl="torch"), want, rtol=1e-5, atol=0)


def test_mixed_dtypes_are_refused():
    with pytest.raises(ValueError, match="one dtype"):
        global_norm([torch.ones(3), torch.ones(3, dtype=torch.bfloat16)], impl="triton")
