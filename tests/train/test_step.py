"""The train step on one process (a mesh of one): accumulation equals one big batch, recomputation
changes nothing but memory, precisions, donation, and the eval step."""

from __future__ import annotations

import pytest
import torch

from fastllm import models, optim, random, tree
from fastllm.sharding import Mesh, Partitioner
from fastllm.train.state import TrainState
from fastllm.train.step import EvalStep, TrainStep

CONFIG = models.preset("tiny-llama", n_layers=2, vocab_size=64, max_seq_len=32)
ONE = Partitioner(Mesh.local())


def batch(rows: int, seq: int = 16, seed: int = 0, config=CONFIG) -> dict:
    tokens = random.randint(random.key(seed), (rows, seq + 1), 0, config.vocab_size)
    targets = tokens[:, 1:].clone()
    targets[0, :5] = -100  # uneven valid counts across micro-batches: the weighting must handle it
    return {"tokens": tokens[:, :-1], "targets": targets}


def step_for(opt, config=CONFIG, **options) -> TrainStep:
    return TrainStep(models.model(config), ONE, opt, **options)


def fresh_state(opt, loss_scale=None, config=CONFIG) -> TrainState:
    params = models.init(config, random.key(1))
    return TrainState(params, opt.init(params), 0, random.key(2), loss_scale)


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(tree.leaves(a), tree.leaves(b)))


def test_grad_accumulation_equals_one_big_batch():
    opt = optim.sgd(0.5)  # plain SGD: parameter change is proportional to the gradient
    data = batch(8)
    one, m_one = step_for(opt, grad_accum=1)(fresh_state(opt), data)
    four, m_four = step_for(opt, grad_accum=4)(fresh_state(opt), data)
    assert torch.allclose(m_one["loss"], m_four["loss"], atol=1e-6)
    assert torch.allclose(m_one["grad_norm"], m_four["grad_norm"], rtol=1e-5)
    assert max_diff(one.params, four.params) < 1e-6
    assert four.step == 1 and m_four["tokens"].item() == 8 * 16 - 5


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mixtral"])
def test_recomputation_gives_identical_loss_and_gradients(preset):
    config = models.preset(preset, vocab_size=64, max_seq_len=32)
    opt, data = optim.adamw(1e-2), batch(2, config=config)
    plain = step_for(opt, config).gradients(fresh_state(opt, config=config), data)
    remat = step_for(opt, config, remat=True).gradients(fresh_state(opt, config=config), data)
    assert torch.equal(plain[1], remat[1])
    assert max_diff(plain[0], remat[0]) < 1e-7


def test_recomputation_keeps_fewer_activations_for_backward():
    opt, data = optim.sgd(0.1), batch(2)

    def saved_bytes(remat: bool) -> int:
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        step = step_for(opt, remat=remat)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step.gradients(fresh_state(opt), data)
        return sum(sizes)

    assert saved_bytes(True) < 0.5 * saved_bytes(False)


def test_grad_norm_is_the_norm_of_the_gradient_before_clipping():
    data = batch(2)
    params = tree.map(lambda p: p.requires_grad_(True), models.init(CONFIG, random.key(1)))
    loss, _ = models.loss(CONFIG, params, data)
    expected = optim.global_norm(torch.autograd.grad(loss, tree.leaves(params)))
    for opt, clip in ((optim.adamw(1e-3), 1e-3), (optim.sgd(0.1), None)):
        _, metrics = step_for(opt, max_grad_norm=clip)(fresh_state(opt), data)
        assert torch.allclose(metrics["grad_norm"], expected, rtol=1e-5)


def test_clipping_in_the_step_equals_clipping_in_the_optimizer():
    data = batch(2)
    in_step, in_optimizer = optim.sgd(0.1), optim.chain(optim.clip_by_global_norm(0.01), optim.sgd(0.1))
    a, _ = step_for(in_step, max_grad_norm=0.01)(fresh_state(in_step), data)
    b, _ = step_for(in_optimizer)(fresh_state(in_optimizer), data)
    assert max_diff(a.params, b.params) < 1e-7
    unclipped, _ = step_for(in_step)(fresh_state(in_step), data)
    assert max_diff(a.params, unclipped.params) > 1e-4  # the clip mattered


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_keeps_fp32_masters_and_tracks_fp32(precision):
    opt = optim.adamw(1e-3)
    loss_scale = optim.dynamic_loss_scale(2.0**10) if precision == "fp16" else None
    data = batch(2)
    ref, m_ref = step_for(opt)(fresh_state(opt), data)
    low, m_low = step_for(opt, precision=precision)(fresh_state(opt, loss_scale), data)
    assert all(p.dtype == torch.float32 for p in tree.leaves(low.params))
    assert all(x.dtype == torch.float32 for x in tree.leaves(low.opt_state) if x.is_floating_point())
    assert abs(m_low["loss"].item() - m_ref["loss"].item()) < 0.05
    assert torch.isfinite(m_low["grad_norm"])


def test_fp16_overflow_skips_the_update_and_halves_the_scale():
    opt = optim.adamw(1e-3)
    state = fresh_state(opt, optim.dynamic_loss_scale(2.0**120))  # fp16 gradients overflow
    new, metrics = step_for(opt, precision="fp16")(state, batch(2))
    assert max_diff(new.params, state.params) == 0.0
    assert metrics["loss_scale"].item() == 2.0**119


def test_donating_and_pure_steps_agree_and_only_the_pure_one_keeps_its_input():
    config, opt = models.preset("tiny-llama"), optim.adamw(1e-2, weight_decay=0.1)
    runs = {}
    for donate in (True, False):
        step = step_for(opt, config, max_grad_norm=1.0, donate=donate)
        state = step.init_state(random.key(0))
        first, before, losses = tree.map(torch.clone, state.params), state.params, []
        for seed in range(3):
            state, metrics = step(state, batch(2, seed=seed, config=config))
            losses.append(float(metrics["loss"]))
            if seed == 0:
                kept = all(torch.equal(a, b) for a, b in zip(tree.leaves(before), tree.leaves(first)))
                assert kept == (not donate), f"donate={donate}: input params {'kept' if kept else 'overwritten'}"
        runs[donate] = (losses, state.params)
    assert runs[True][0][0] == runs[False][0][0]
    torch.testing.assert_close(torch.tensor(runs[True][0]), torch.tensor(runs[False][0]), rtol=1e-5, atol=0)
    for a, b in zip(tree.leaves(runs[True][1]), tree.leaves(runs[False][1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_init_state_is_the_model_init():
    step = step_for(optim.sgd(0.1))
    state = step.init_state(random.key(3))
    expected = models.init(CONFIG, random.fold_in(random.key(3), "params"))
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(state.params), tree.leaves(expected)))


def test_eval_step_matches_model_loss():
    params = models.init(CONFIG, random.key(1))
    data = batch(2)
    expected, _ = models.loss(CONFIG, params, data)
    assert torch.equal(EvalStep(models.model(CONFIG), ONE)(params, data)["loss"], expected)


@pytest.mark.parametrize("donate,poison", [(True, "gradients"), (True, "loss"), (False, "both")])
def test_a_non_finite_step_changes_nothing_and_is_flagged(donate, poison):
    """A NaN loss or gradient skips the update on the fused (donating) path and the pure chain alike:
    params and optimizer state, step counters included, keep their bits; the next good step
    proceeds as if the bad one had not been there."""
    opt = optim.adamw(1e-2, weight_decay=0.1)
    step = step_for(opt, donate=donate)
    state, _ = step(fresh_state(opt), batch(2, seed=1))
    before = tree.map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, (state.params, state.opt_state))
    real = step.gradients

    def poisoned(state, data):
        grads, loss, tokens = real(state, data)
        if poison != "loss":
            grads = tree.map(lambda g: g * float("nan"), grads)
        return grads, loss * float("nan") if poison != "gradients" else loss, tokens

    step.gradients = poisoned
    skipped, metrics = step(state, batch(2, seed=2))
    assert metrics["nonfinite"].item() and skipped.step == 2
    for got, want in zip(tree.leaves((skipped.params, skipped.opt_state)), tree.leaves(before)):
        assert torch.equal(got, want) if isinstance(got, torch.Tensor) else got == want
    step.gradients = real
    after, metrics = step(skipped, batch(2, seed=3))
    assert not metrics["nonfinite"].item()
    reference = step_for(opt, donate=donate)
    direct, _ = reference(reference(fresh_state(opt), batch(2, seed=1))[0], batch(2, seed=3))
    assert max_diff(after.params, direct.params) == 0 and max_diff(after.opt_state, direct.opt_state) == 0
