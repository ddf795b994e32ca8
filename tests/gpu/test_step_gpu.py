"""The bf16 train step on CUDA: the compute copy that the fused AdamW kernel writes (Triton's
rounding) is the masters cast by torch, and steps with it equal steps that cast every time."""

import pytest
import torch

import fastllm_api as api
from fastllm import optim, tree
from helpers import check, check_trees


def test_the_kernel_written_compute_copy_is_the_cast_masters(gen, device):
    config, params = api.tiny_model("tiny-llama", device, vocab_size=1000)
    batches = [api.batch(config, gen, device) for _ in range(3)]
    kept_losses, kept, step = api.bf16_steps(config, params, batches, keep_copy=True)
    cast_losses, cast, _ = api.bf16_steps(config, params, batches, keep_copy=False)
    assert step.compute_copy.casts == 1, "the optimizer did not keep the copy: every step cast again"
    copy = tree.flatten(step.compute_copy.copy)
    rounded = tree.flatten(optim.cast_tree(kept, torch.bfloat16))
    wrong = [path for path in copy if not torch.equal(copy[path], rounded[path])]
    assert not wrong, f"the kernel's bf16 copy is not the masters rounded by torch at {wrong}"
    for got, want in zip(kept_losses, cast_losses):
        check(got, want.double(), what="loss")
    check_trees(kept, cast, "params after three steps")


def test_step_batches_stay_pinned(device):
    """The Trainer copies each step's batch with ``non_blocking=True``: from pageable memory that copy
    waits for the GPU's queue to drain, so the loader's pinned batches must stay pinned."""
    from fastllm.train.data import StepBatches

    if device.type != "cuda":
        pytest.skip("pinned memory needs CUDA (tests/train/test_step_batches.py checks the rest on the CPU)")

    def pinned_micro_batches():
        while True:
            yield {"tokens": torch.zeros(2, 8, dtype=torch.long).pin_memory()}

    for grad_accum in (1, 3):
        batch = next(StepBatches(pinned_micro_batches(), grad_accum))
        assert batch["tokens"].is_pinned(), f"grad_accum={grad_accum}: the step's batch is pageable"
