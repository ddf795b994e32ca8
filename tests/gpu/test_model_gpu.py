"""The whole model with every kernel on equals the float64 model with every kernel off, on CUDA.

As tests/kernels/test_model_equality.py, with what the CPU cannot run: compiled Triton kernels,
attention fused too, FlexAttention (and its backward) for packed documents and sliding windows.
Loss and every gradient through ``torch.autograd.grad``, fp32 against float64.
"""

import importlib

import pytest
import torch

import fastllm_api as api
from fastllm import tree
from fastllm.kernels import KernelConfig, _triton
from helpers import check, check_trees

ATTENTION = importlib.import_module("fastllm.kernels.attention")
# (preset, packed documents, Triton kernel modules the kernels-on run must launch)
CASES = {"tiny-llama": (True, {"norm", "rotary", "activation", "cross_entropy"}),
         "tiny-mistral": (False, {"norm", "rotary", "activation", "cross_entropy"}),  # sliding window 8
         "tiny-mixtral": (True, {"norm", "rotary", "cross_entropy", "moe", "grouped_matmul", "activation"}),
         "tiny-gpt2": (False, {"norm", "activation", "cross_entropy"})}


def _record(monkeypatch) -> set:
    """Names of the kernel modules launched, and "attention_reference" whenever that runs."""
    ran, launch, reference = set(), _triton.launch, ATTENTION.attention_reference

    def recording_launch(kernel, *args, **meta):
        ran.add(getattr(kernel, "fn", kernel).__module__.rsplit(".", 1)[-1])
        return launch(kernel, *args, **meta)

    def recording_reference(*args, **kwargs):
        ran.add("attention_reference")
        return reference(*args, **kwargs)

    monkeypatch.setattr(_triton, "launch", recording_launch)
    monkeypatch.setattr(ATTENTION, "attention_reference", recording_reference)
    return ran


def _case(name):
    packed, _ = CASES[name]
    masked = packed or name == "tiny-mistral"
    return pytest.param(name, marks=[pytest.mark.cuda_only("FlexAttention has no CPU backward")] if masked else [])


@pytest.mark.parametrize("name", [_case(name) for name in sorted(CASES)])
def test_kernels_on_equal_float64_kernels_off(name, gen, device, monkeypatch):
    packed, fused = CASES[name]
    config, params = api.tiny_model(name, device, n_layers=2, vocab_size=1000)
    data = api.batch(config, gen, device, packed=packed)
    ran = _record(monkeypatch)
    exact_loss, exact_grads = api.loss_and_grads(config, tree.map(torch.Tensor.double, params), data,
                                                 kernels=KernelConfig.all("torch"))
    ran.clear()
    loss, grads = api.loss_and_grads(config, params, data, kernels=KernelConfig.all("triton"))
    assert ran == fused, f"launched {sorted(ran)}"  # every op fused, attention's reference never ran
    check(loss, exact_loss, what="loss")
    check_trees(grads, exact_grads, "gradient")
