"""The real model with every kernel on (Triton, interpreted on CPU) equals the model with every kernel off.

``models.loss`` picks each op's implementation from ``config.kernels``; here the whole decoder (norms,
rotary, activations, MoE experts, fused LM head + cross-entropy) runs the Triton kernels and is
compared, loss and every gradient through ``torch.func.grad``, with ``KernelConfig.all("torch")``.
Attention stays on the reference in both: its fused path is PyTorch's SDPA/FlexAttention, and
FlexAttention has no CPU backward (its forward is checked in test_attention.py).
"""

import pytest
import torch

from fastllm import models, random, tree
from fastllm.kernels import KernelConfig, _triton

KERNELS_ON = KernelConfig.all("triton").replace(attention="torch")
KERNELS_OFF = KernelConfig.all("torch")


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


# tiny-llama: RMSNorm, rotary, SwiGLU; tiny-mixtral: MoE experts (grouped matmul, no padding);
# tiny-gpt2: LayerNorm, tanh GELU, learned positions, tied head
@pytest.mark.parametrize("name", sorted(FUSED))
def test_kernels_on_equal_kernels_off(name, monkeypatch):
    base = models.preset(name, n_layers=2, vocab_size=300)
    params = models.init(base, random.key(0))
    batch = _batch(base, torch.Generator().manual_seed(1))

    def loss_with(kernels):
        config = base.replace(kernels=kernels)
        return torch.func.grad_and_value(lambda p: models.loss(config, p, batch)[0])(params)

    launched = set()
    monkeypatch.setattr(_triton, "launch", _recording_launch(launched))
    want_grads, want = loss_with(KERNELS_OFF)
    assert not launched
    got_grads, got = loss_with(KERNELS_ON)
    assert launched == FUSED[name]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want_flat = tree.flatten(want_grads)
    for path, g in tree.flatten(got_grads).items():
        torch.testing.assert_close(g, want_flat[path], rtol=1e-4, atol=1e-6, msg=path)
    # "auto" on CPU is the reference, bit for bit
    assert torch.equal(models.loss(base, params, batch)[0], want)
