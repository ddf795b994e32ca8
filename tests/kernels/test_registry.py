import importlib

import pytest
import torch

from fastllm.kernels import KernelConfig, resolve, select

REGISTRY = importlib.import_module("fastllm.kernels.registry")


def test_auto_is_torch_on_cpu_and_fields_switch_per_op():
    config = KernelConfig(rms_norm="triton")
    assert select(config, "rms_norm", "cpu") == "triton"
    assert select(config, "layer_norm", "cpu") == "torch"
    assert select(None, "cross_entropy", torch.device("cpu")) == "torch"
    assert select(KernelConfig.all("torch"), "rotary", "cuda") == "torch"


def test_planted_auto_ignoring_the_device_is_caught(monkeypatch):
    """``"auto"`` meaning Triton wherever it imports (the CUDA test dropped): CPU runs would interpret."""
    resolve_for_any_device = lambda choice, device: "triton" if choice == "auto" else choice  # noqa: E731
    monkeypatch.setattr(REGISTRY, "resolve", resolve_for_any_device)
    with pytest.raises(AssertionError):
        test_auto_is_torch_on_cpu_and_fields_switch_per_op()


def test_bad_choices_name_the_field():
    # under FASTLLM_TYPECHECK the Literal annotation rejects it first; both messages name the field
    with pytest.raises((ValueError, TypeError), match="rotary"):
        KernelConfig(rotary="fast")
    with pytest.raises(ValueError, match="unknown kernel op"):
        select(KernelConfig(), "softmax", "cpu")
    with pytest.raises((ValueError, TypeError), match="gpu"):
        resolve("gpu", "cpu")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    from fastllm.kernels import rms_norm

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rms_norm(torch.ones(2, 4), torch.ones(4), impl="triton")
