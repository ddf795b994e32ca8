"""The fused AdamW path (optim.apply_gradients with optim.adamw's ``fused``) against the unfused chain.

Same numbers up to fp32 rounding (the kernel computes ``b1 m + (1 - b1) g`` where the chain lerps),
the same state pytree, params and moments written in place; leaves the kernel cannot take fall
back to the chain; the train step gives the same losses either way.
"""

from __future__ import annotations

import optree
import pytest
import torch

from fastllm import models, optim, random, tree
from fastllm.kernels import KernelConfig
from fastllm.train.state import TrainState
from fastllm.sharding import Mesh, Partitioner
from fastllm.train.step import TrainStep

STEPS = 5
CLOSE = dict(rtol=1e-6, atol=1e-6)  # a few fp32 ulps on values of order 1


def params_tree(seed: int = 0) -> dict:
    """Decayed matrices, and an embedding, norm scales and biases that do not decay (a tensor over
    two kernel chunks is tests/kernels' business: the interpreter is slow)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "embed": {"tokens": torch.randn(12, 8, generator=gen)},
        "layers": [{"w": torch.randn(8, 8, generator=gen), "norm": {"scale": 1 + 0.1 * torch.randn(8, generator=gen)},
                    "b": torch.randn(8, generator=gen)} for _ in range(2)],
        "head": {"w": torch.randn(300, 8, generator=gen)},
    }


def gradients(params: dict, step: int, dtype=torch.float32) -> dict:
    gen = torch.Generator().manual_seed(100 + step)
    return tree.map(lambda p: torch.randn(p.shape, generator=gen).to(dtype), params)


def run(opt, *, fused: bool, impl: str = "torch", grad_dtype=torch.float32, grad_scale=None):
    """(params, state, whether every step kept the input param tensors) after STEPS steps."""
    params = params_tree()
    state, in_place = opt.init(params), True
    transform = opt if fused else opt._replace(fused=None)
    for step in range(STEPS):
        before = tree.leaves(params)
        params, state = optim.apply_gradients(
            transform, gradients(params, step, grad_dtype), state, params,
            kernels=KernelConfig(adamw=impl, grad_norm=impl), grad_scale=grad_scale)
        in_place = in_place and all(a is b for a, b in zip(before, tree.leaves(params)))
    return params, state, in_place


def assert_same_state_layout(got, want) -> None:
    assert optree.tree_structure(got) == optree.tree_structure(want)
    for a, b in zip(optree.tree_leaves(got), optree.tree_leaves(want)):
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device)


SCHEDULE = optim.schedules.cosine(3e-2, total_steps=STEPS + 1, warmup_steps=2, min_ratio=0.1)
CASES = {  # name: (adamw arguments, gradient dtype)
    "schedule_clip": (dict(learning_rate=SCHEDULE, weight_decay=0.1, max_grad_norm=1.0), torch.float32),
    "schedule_noclip": (dict(learning_rate=SCHEDULE, weight_decay=0.1, b2=0.95, eps=1e-6), torch.float32),
    # no clipping here: the chain rounds clipped bf16 gradients back to bf16, the kernel scales in fp32
    "constant_bf16_grads": (dict(learning_rate=1e-2, weight_decay=0.1), torch.bfloat16),
}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_the_chain(case, impl):
    arguments, grad_dtype = CASES[case]
    opt = optim.adamw(**arguments)
    want_params, want_state, _ = run(opt, fused=False, grad_dtype=grad_dtype)
    got_params, got_state, in_place = run(opt, fused=True, impl=impl, grad_dtype=grad_dtype)
    assert in_place  # the fused path ran (the chain returns new tensors)
    assert_same_state_layout(got_state, want_state)
    for a, b in zip(tree.leaves(got_params) + optree.tree_leaves(got_state),
                    tree.leaves(want_params) + optree.tree_leaves(want_state)):
        if a.ndim:  # params and moments; the 0-d leaves are counters (equal) and the norm (below)
            torch.testing.assert_close(a, b, **CLOSE)
        elif not a.is_floating_point():
            assert torch.equal(a, b)
    assert int(optim.get_state(got_state, optim.ScaleByAdamState).count) == STEPS
    if "max_grad_norm" in arguments:  # the clip engaged, and the state keeps the pre-clip norm
        norm, want_norm = (optim.get_state(s, optim.ClipByGlobalNormState).norm for s in (got_state, want_state))
        torch.testing.assert_close(norm, want_norm, rtol=1e-5, atol=0)  # fp32 sums of 140k squares
        assert norm > 10 * arguments["max_grad_norm"]
    # the mask: head.w decays, the embedding does not (both are matrices)
    undecayed, _, _ = run(optim.adamw(**{**arguments, "weight_decay": 0.0}), fused=True, impl=impl,
                          grad_dtype=grad_dtype)
    assert not torch.allclose(undecayed["head"]["w"], got_params["head"]["w"], rtol=0, atol=1e-6)
    assert torch.equal(undecayed["embed"]["tokens"], got_params["embed"]["tokens"])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_grad_scale_is_applied_to_the_gradients_first(impl):
    """The sharded step clips outside the optimizer and passes the factor as ``grad_scale``."""
    opt = optim.adamw(SCHEDULE, weight_decay=0.1, max_grad_norm=1.0)
    scale = torch.tensor(0.25)
    got_params, got_state, in_place = run(opt, fused=True, impl=impl, grad_scale=scale)
    want_params, want_state, _ = run(opt, fused=False, grad_scale=scale)
    assert in_place
    for a, b in zip(tree.leaves((got_params, got_state)), tree.leaves((want_params, want_state))):
        torch.testing.assert_close(a, b, **CLOSE)


def _mixed_grad_dtypes(params, grads):
    grads["embed"]["tokens"] = grads["embed"]["tokens"].bfloat16()
    return params, grads


def _non_contiguous_param(params, grads):
    params["head"]["w"] = torch.randn(8, 300).t()  # a transposed view
    return params, grads


def _bf16_params(params, grads):
    return optim.cast_tree(params, torch.bfloat16), grads


@pytest.mark.parametrize("make", [_mixed_grad_dtypes, _non_contiguous_param, _bf16_params])
def test_leaves_the_kernel_cannot_take_fall_back_to_the_chain(make):
    opt = optim.adamw(SCHEDULE, weight_decay=0.1, max_grad_norm=1.0)
    params, grads = make(params_tree(), gradients(params_tree(), 0))
    state = opt.init(params)
    kept = [t.clone() for t in tree.leaves((params, state))]
    want_updates, want_state = opt.update(grads, state, params)
    got_params, got_state = optim.apply_gradients(opt, grads, state, params, kernels=KernelConfig.all("triton"))
    for a, b in zip(tree.leaves(got_params), tree.leaves(optim.apply_updates(params, want_updates))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_same_state_layout(got_state, want_state)
    for a, b in zip(tree.leaves((params, state)), kept):  # nothing was written in place
        assert torch.equal(a, b)


def test_train_step_gives_the_same_losses_fused_or_not():
    config = models.preset("tiny-llama", n_layers=2, vocab_size=64, max_seq_len=32)
    opt = optim.adamw(optim.schedules.cosine(1e-2, total_steps=4, warmup_steps=1), weight_decay=0.1,
                      max_grad_norm=1.0)
    tokens = random.randint(random.key(0), (2, 17), 0, config.vocab_size)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
    losses, finals = {}, {}
    for donate in (True, False):
        params = models.init(config, random.key(1))
        state, first = TrainState(params, opt.init(params), 0, random.key(2)), tree.leaves(params)
        step, losses[donate] = TrainStep(models.model(config), Partitioner(Mesh.local()), opt, donate=donate), []
        for _ in range(3):
            state, metrics = step(state, batch)
            losses[donate].append(metrics["loss"])
        finals[donate] = state.params
        assert all(a is b for a, b in zip(first, tree.leaves(state.params))) == donate  # fused: in place
    torch.testing.assert_close(torch.stack(losses[True]), torch.stack(losses[False]), rtol=1e-6, atol=0)
    assert losses[True][2] < losses[True][0]
    for a, b in zip(tree.leaves(finals[True]), tree.leaves(finals[False])):
        torch.testing.assert_close(a, b, **CLOSE)
