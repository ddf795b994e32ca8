"""Inductor on CUDA: compiled decoder blocks and a compiled train step against eager.

tests/train/compile_checks.py checks dynamo's capture with the ``aot_eager`` backend on CPU;
inductor's code generation (Triton on CUDA) runs only here. The compiled blocks take the torch
references of the elementwise kernels (inductor fuses those itself) and keep fused attention.
"""

import pytest
import torch

import fastllm_api as api
from fastllm import tree
from fastllm.kernels import KernelConfig
from helpers import check, check_trees

pytestmark = [pytest.mark.compiles,
              pytest.mark.cuda_only("inductor's CPU code generation is not what this checks, and takes minutes")]


@pytest.mark.parametrize("packed", [False, True])  # flash SDPA, FlexAttention inside the compiled block
def test_compiled_blocks_equal_float64_eager(packed, gen, device):
    config, params = api.tiny_model("tiny-llama", device, vocab_size=1000)
    data = api.batch(config, gen, device, packed=packed)
    exact_loss, exact_grads = api.loss_and_grads(config, tree.map(torch.Tensor.double, params), data,
                                                 kernels=KernelConfig.all("torch"))
    loss, grads = api.loss_and_grads(config, params, data, compile=True)
    check(loss, exact_loss, what="loss")
    check_trees(grads, exact_grads, "gradient")


def test_compiled_train_step_equals_eager(gen, device):
    """One AdamW step of two micro-batches; against the eager step (the step has no float64 run)."""
    config, params = api.tiny_model("tiny-llama", device, vocab_size=1000)
    data = api.batch(config, gen, device, rows=4, packed=True)
    eager_params, eager_loss = api.train_step(config, params, data, compile=False)
    compiled_params, compiled_loss = api.train_step(config, params, data, compile=True)
    check(compiled_loss, eager_loss.double(), what="loss")
    check_trees(compiled_params, eager_params, "params after the step")
    unmoved = [path for path, value in tree.flatten(params).items() if torch.equal(eager_params[path], value)]
    assert not unmoved, f"the step left {unmoved} where they were"
