"""A tiny model with every kernel on (Triton, interpreted on CPU) equals the model with kernels off."""

import pytest
import torch

from fastllm import models, random, tree
from fastllm.kernels import KernelConfig
from kernel_model import loss as kernel_loss


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral", "tiny-gpt2"])
def test_kernels_on_equal_kernels_off(name):
    config = models.preset(name, n_layers=2, vocab_size=300)
    params = models.init(config, random.key(0))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=gen)
    targets = torch.randint(0, config.vocab_size, (2, 12), generator=gen)
    targets[0, :3] = -100
    loss_mask = torch.rand(2, 12, generator=gen) > 0.2
    batch = {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}

    kernels_on = KernelConfig.all("triton")
    want_grads, want = torch.func.grad_and_value(lambda p: models.loss(config, p, batch)[0])(params)
    got_grads, got = torch.func.grad_and_value(lambda p: kernel_loss(config, p, batch, kernels_on))(params)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want_flat = tree.flatten(want_grads)
    for path, g in tree.flatten(got_grads).items():
        torch.testing.assert_close(g, want_flat[path], rtol=1e-4, atol=1e-6, msg=path)
    # and the torch references behind the same adapter give the same numbers
    torch.testing.assert_close(kernel_loss(config, params, batch, KernelConfig.all("torch")), got,
                               rtol=1e-5, atol=1e-5)
