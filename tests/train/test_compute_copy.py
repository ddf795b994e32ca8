"""The bf16 compute copy kept from step to step (fastllm.train.compute_copy): the same bits as
casting the masters every step, one cast per run, and a fresh cast whenever the masters change
behind the optimizer's back."""

from __future__ import annotations

import pytest
import torch

from fastllm import models, optim, random, tree
from fastllm.sharding import Mesh, Partitioner
from fastllm.train.step import TrainStep

ONE = Partitioner(Mesh.local())


def batch(config, seed: int) -> dict:
    tokens = random.randint(random.key(seed), (2, 17), 0, config.vocab_size)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}


def run(preset: str, keep_copy: bool, steps: int = 3, *, between=None):
    """(losses, grad norms, final state, the step) of ``steps`` bf16 AdamW steps with clipping."""
    config = models.preset(preset, vocab_size=64, max_seq_len=32)
    step = TrainStep(models.model(config), ONE, optim.adamw(1e-2, weight_decay=0.1), precision="bf16",
                     max_grad_norm=0.5)
    if not keep_copy:
        step.compute_copy = None  # every step casts the masters and widens the gradients, as before
    state = step.init_state(random.key(0))
    losses, norms = [], []
    for seed in range(steps):
        if between is not None and seed:
            state = between(state)
        state, metrics = step(state, batch(config, seed))
        losses.append(metrics["loss"].item())
        norms.append(metrics["grad_norm"].item())
    return losses, norms, state, step


def same_bits(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(tree.leaves(a), tree.leaves(b)))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mixtral", "tiny-gpt2"])
def test_the_kept_copy_gives_the_bits_of_casting_every_step(preset):
    kept = run(preset, keep_copy=True)
    cast = run(preset, keep_copy=False)
    assert kept[0] == cast[0] and kept[1] == cast[1]
    assert same_bits(kept[2].params, cast[2].params)
    assert same_bits(kept[2].opt_state, cast[2].opt_state)
    assert kept[3].compute_copy.casts == 1  # the optimizer wrote every later step's copy


def test_the_copy_holds_the_masters_rounded_after_every_step():
    *_, state, step = run("tiny-llama", keep_copy=True, steps=2)
    assert same_bits(step.compute_copy.copy, optim.cast_tree(state.params, torch.bfloat16))


def test_masters_written_elsewhere_are_cast_again():
    """A checkpoint loaded in place (``copy_``) or a state of new tensors: the next step casts."""
    def load_in_place(state):
        with torch.no_grad():
            for p in tree.leaves(state.params):
                p.copy_(p * 0.5)
        return state

    def swap(state):
        return state._replace(params=tree.map(lambda p: p.clone() * 0.5, state.params))

    for between in (load_in_place, swap):
        kept = run("tiny-llama", keep_copy=True, between=between)
        cast = run("tiny-llama", keep_copy=False, between=between)
        assert kept[0] == cast[0], between.__name__
        assert same_bits(kept[2].params, cast[2].params), between.__name__
        assert kept[3].compute_copy.casts == 3, between.__name__


@pytest.mark.parametrize("options", [dict(grad_accum=2), dict(precision="fp32"), dict(donate=False)])
def test_the_copy_is_kept_only_where_its_gradient_is_the_masters(options):
    config = models.preset("tiny-llama", vocab_size=64, max_seq_len=32)
    options = {"precision": "bf16", **options}
    assert TrainStep(models.model(config), ONE, optim.adamw(1e-2), **options).compute_copy is None
    assert TrainStep(models.model(config), ONE, optim.adamw(1e-2), precision="bf16").compute_copy is not None


def test_a_model_copy_is_written_by_the_chain_when_the_fused_pass_declines():
    params = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    grads = tree.map(torch.randn_like, params)
    copy = optim.cast_tree(params, torch.bfloat16)
    opt = optim.sgd(0.1)  # no fused pass
    new, _ = optim.apply_gradients(opt, grads, opt.init(params), params, model_copy=copy)
    assert same_bits(copy, optim.cast_tree(new, torch.bfloat16))
