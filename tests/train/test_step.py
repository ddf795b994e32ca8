"""The pure train step: accumulation equals one big batch, recomputation changes nothing, precisions."""

from __future__ import annotations

import pytest
import torch

from fastllm import models, optim, random, tree
from fastllm.train.state import TrainState
from fastllm.train.step import make_eval_step, make_train_step

CONFIG = models.preset("tiny-llama", n_layers=2, vocab_size=64, max_seq_len=32)


def batch(rows: int, seq: int = 16, seed: int = 0) -> dict:
    tokens = random.randint(random.key(seed), (rows, seq + 1), 0, CONFIG.vocab_size)
    targets = tokens[:, 1:].clone()
    targets[0, :5] = -100  # uneven valid counts across micro-batches: the weighting must handle it
    return {"tokens": tokens[:, :-1], "targets": targets}


def fresh_state(opt, loss_scale=None) -> TrainState:
    params = models.init(CONFIG, random.key(1))
    return TrainState(params, opt.init(params), 0, random.key(2), loss_scale)


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(tree.leaves(a), tree.leaves(b)))


def test_grad_accumulation_equals_one_big_batch():
    opt = optim.sgd(0.5)  # plain SGD: parameter change is proportional to the gradient
    data = batch(8)
    one, m_one = make_train_step(CONFIG, opt, grad_accum=1)(fresh_state(opt), data)
    four, m_four = make_train_step(CONFIG, opt, grad_accum=4)(fresh_state(opt), data)
    assert torch.allclose(m_one["loss"], m_four["loss"], atol=1e-6)
    assert torch.allclose(m_one["grad_norm"], m_four["grad_norm"], rtol=1e-5)
    assert max_diff(one.params, four.params) < 1e-6
    assert four.step == 1 and m_four["tokens"].item() == 8 * 16 - 5


def test_block_recomputation_gives_identical_loss_and_update():
    opt = optim.adamw(1e-2)
    data = batch(2)
    plain, m_plain = make_train_step(CONFIG, opt)(fresh_state(opt), data)
    remat, m_remat = make_train_step(CONFIG, opt, remat="block")(fresh_state(opt), data)
    assert torch.equal(m_plain["loss"], m_remat["loss"])
    assert max_diff(plain.params, remat.params) < 1e-7


def test_moe_block_recomputation_matches_the_model_loss_and_gradients():
    config = models.preset("tiny-mixtral", vocab_size=64, max_seq_len=32)
    params = tree.map(lambda p: p.requires_grad_(True), models.init(config, random.key(0)))
    data = batch(2)
    expected, _ = models.loss(config, params, data)
    got, metrics = models.loss(config, params, data, remat=True)
    assert torch.allclose(expected, got, atol=1e-6) and metrics["moe_aux_loss"] > 0
    leaves = tree.leaves(params)
    for a, b in zip(torch.autograd.grad(expected, leaves), torch.autograd.grad(got, leaves)):
        assert torch.allclose(a, b, atol=1e-6)


def test_block_recomputation_keeps_fewer_activations_for_backward():
    params = tree.map(lambda p: p.requires_grad_(True), models.init(CONFIG, random.key(1)))
    data = batch(2)

    def saved_bytes(remat: bool) -> int:
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            models.loss(CONFIG, params, data, remat=remat)
        return sum(sizes)

    assert saved_bytes(True) < 0.5 * saved_bytes(False)


def test_grad_norm_is_the_clipping_norm_or_computed_without_clipping():
    data = batch(2)
    for opt in (optim.adamw(1e-3, max_grad_norm=1e-3), optim.sgd(0.1)):
        _, metrics = make_train_step(CONFIG, opt)(fresh_state(opt), data)
        params = tree.map(lambda p: p.requires_grad_(True), models.init(CONFIG, random.key(1)))
        loss, _ = models.loss(CONFIG, params, data)
        expected = optim.global_norm(torch.autograd.grad(loss, tree.leaves(params)))
        assert torch.allclose(metrics["grad_norm"], expected, rtol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_keeps_fp32_masters_and_tracks_fp32(precision):
    opt = optim.adamw(1e-3)
    loss_scale = optim.dynamic_loss_scale(2.0**10) if precision == "fp16" else None
    data = batch(2)
    ref, m_ref = make_train_step(CONFIG, opt)(fresh_state(opt), data)
    low, m_low = make_train_step(CONFIG, opt, precision=precision)(fresh_state(opt, loss_scale), data)
    assert all(p.dtype == torch.float32 for p in tree.leaves(low.params))
    assert all(x.dtype == torch.float32 for x in tree.leaves(low.opt_state) if x.is_floating_point())
    assert abs(m_low["loss"].item() - m_ref["loss"].item()) < 0.05
    assert torch.isfinite(m_low["grad_norm"])


def test_fp16_overflow_skips_the_update_and_halves_the_scale():
    opt = optim.adamw(1e-3)
    state = fresh_state(opt, optim.dynamic_loss_scale(2.0**120))  # fp16 gradients overflow
    new, metrics = make_train_step(CONFIG, opt, precision="fp16")(state, batch(2))
    assert max_diff(new.params, state.params) == 0.0
    assert metrics["loss_scale"].item() == 2.0**119


def test_eval_step_matches_model_loss():
    params = models.init(CONFIG, random.key(1))
    data = batch(2)
    expected, _ = models.loss(CONFIG, params, data)
    assert torch.equal(make_eval_step(CONFIG)(params, data)["loss"], expected)
