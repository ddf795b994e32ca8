"""The Trainer's step batches keep the loader's pinned memory: one micro-batch passes through as it
is, several are concatenated (and pinned again where the loader pinned; tests/gpu checks that)."""

from __future__ import annotations

import torch

from fastllm.train.data import StepBatches


def micro_batches(n: int):
    for i in range(n):
        yield {"tokens": torch.full((2, 4), i), "targets": torch.full((2, 4), -i)}


def test_one_micro_batch_reaches_the_step_as_the_loader_made_it():
    loader = micro_batches(2)
    first = next(micro_batches(1))
    got = next(StepBatches(loader, 1))
    assert torch.equal(got["tokens"], first["tokens"])
    made = next(StepBatches(iter([first]), 1))
    assert all(made[name] is first[name] for name in first), "a step of one micro-batch was copied"


def test_several_micro_batches_are_concatenated_in_order():
    got = next(StepBatches(micro_batches(3), 3))
    assert got["tokens"][:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert got["targets"][:, 0].tolist() == [0, 0, -1, -1, -2, -2]
    assert not got["tokens"].is_pinned()  # the loader did not pin: nor does the step
