"""The real model with every kernel on (Triton, interpreted on CPU) equals the float64 model with every kernel off.

``models.loss`` picks each op's implementation from ``config.kernels``; here the whole decoder (norms,
rotary, attention, activations, MoE experts, fused LM head + cross-entropy) runs the kernels in fp32
and is compared, loss and every gradient through ``torch.func.grad``, with ``KernelConfig.all("torch")``
on the same parameters in float64. Attention's fused path is flash SDPA here (these models have no
sliding window and the batch no segment ids), which has a CPU backward; FlexAttention's has none,
so the masked paths run at model level in the GPU suite (tests/gpu/test_model_gpu.py).
"""

import importlib

import pytest
import torch

from fastllm import models, random, tree
from fastllm.kernels import KernelConfig, _triton
from helpers import check, check_trees

KERNELS_ON = KernelConfig.all("triton")
KERNELS_OFF = KernelConfig.all("torch")
ATTENTION = importlib.import_module("fastllm.kernels.attention")


def _batch(config, gen):
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=gen)
    targets = torch.randint(0, config.vocab_size, (2, 12), generator=gen)
    targets[0, :3] = -100
    loss_mask = torch.rand(2, 12, generator=gen) > 0.2
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}


# which kernel modules each model must launch: nothing may silently fall back to the reference
FUSED = {"tiny-llama": {"norm", "rotary", "activation", "cross_entropy"},
         "tiny-mixtral": {"norm", "rotary", "cross_entropy", "moe", "grouped_matmul", "activation"},
         "tiny-gpt2": {"norm", "activation", "cross_entropy"}}


def _recording_launch(launched):
    launch = _triton.launch

    def record(kernel, *args, **meta):
        launched.add(getattr(kernel, "fn", kernel).__module__.rsplit(".", 1)[-1])
        return launch(kernel, *args, **meta)

    return record


def _recording_reference(launched):
    """Attention's reference, noting that it ran (the fused path is PyTorch's, not a Triton launch)."""
    reference = ATTENTION.attention_reference

    def record(*args, **kwargs):
        launched.add("attention_reference")
        return reference(*args, **kwargs)

    return record


def _loss_and_grads(config, kernels, params, batch):
    config = config.replace(kernels=kernels)
    grads, loss = torch.func.grad_and_value(lambda p: models.loss(config, p, batch)[0])(params)
    return loss, tree.flatten(grads)


# tiny-llama: RMSNorm, rotary, SwiGLU; tiny-mixtral: MoE experts (grouped matmul, no padding);
# tiny-gpt2: LayerNorm, tanh GELU, learned positions, tied head
@pytest.mark.parametrize("name", sorted(FUSED))
def test_kernels_on_equal_float64_kernels_off(name, monkeypatch, gen):
    base = models.preset(name, n_layers=2, vocab_size=300)
    params = models.init(base, random.key(0))
    batch = _batch(base, gen)
    launched = set()
    monkeypatch.setattr(_triton, "launch", _recording_launch(launched))
    monkeypatch.setattr(ATTENTION, "attention_reference", _recording_reference(launched))
    exact_loss, exact_grads = _loss_and_grads(base, KERNELS_OFF, tree.map(torch.Tensor.double, params), batch)
    assert launched == {"attention_reference"}
    launched.clear()
    loss, grads = _loss_and_grads(base, KERNELS_ON, params, batch)
    assert launched == FUSED[name]
    check(loss, exact_loss, what="loss")
    check_trees(grads, exact_grads, "gradient")
    # "auto" on CPU is the reference, bit for bit
    assert torch.equal(models.loss(base, params, batch)[0], models.loss(base.replace(kernels=KERNELS_OFF),
                                                                        params, batch)[0])


def test_planted_norm_eps_is_caught(gen):
    """The kernels-on model normalising with eps 1e-4 for 1e-5 (a kernel reading the wrong field)."""
    base = models.preset("tiny-llama", n_layers=2, vocab_size=300)
    params = models.init(base, random.key(0))
    batch = _batch(base, gen)
    _, exact_grads = _loss_and_grads(base, KERNELS_OFF, tree.map(torch.Tensor.double, params), batch)
    _, grads = _loss_and_grads(base.replace(norm_eps=1e-4), KERNELS_ON, params, batch)
    with pytest.raises(AssertionError, match="not close"):
        check_trees(grads, exact_grads, "gradient")
