"""The sharded step donates its input state by default (fused AdamW in place) and keeps it with
``donate=False`` (the optimizer's pure chain); both give the same training (one process)."""

import torch

from fastllm import models, optim, random, tree
from fastllm.sharding import Mesh, Partitioner
from fastllm.train.sharded_step import init_sharded_state, make_sharded_train_step


def _batch(config, seed):
    ids = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(seed))
    return {"tokens": ids[:, :-1], "targets": ids[:, 1:]}


def test_donating_and_pure_sharded_steps_agree_and_only_the_pure_one_keeps_its_input():
    config = models.preset("tiny-llama")
    partitioner = Partitioner(Mesh(), zero_stage=3)
    opt = optim.adamw(1e-2, weight_decay=0.1)
    runs = {}
    for donate in (True, False):
        step = make_sharded_train_step(config, partitioner, opt, max_grad_norm=1.0, donate=donate)
        state = init_sharded_state(config, partitioner, opt, random.key(0))
        first = tree.map(torch.clone, state.params)
        before = state.params
        losses = []
        for seed in range(3):
            state, metrics = step(state, _batch(config, seed))
            losses.append(float(metrics["loss"]))
            if seed == 0:
                kept = all(torch.equal(a, b) for a, b in zip(tree.leaves(before), tree.leaves(first)))
                assert kept == (not donate), f"donate={donate}: input params {'kept' if kept else 'overwritten'}"
        runs[donate] = (losses, state.params)
    assert runs[True][0][0] == runs[False][0][0]
    for a, b in zip(runs[True][0], runs[False][0]):
        assert abs(a - b) <= 1e-5 * abs(b), (runs[True][0], runs[False][0])
    for a, b in zip(tree.leaves(runs[True][1]), tree.leaves(runs[False][1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
