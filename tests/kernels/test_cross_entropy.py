import pytest
import torch
import torch.nn.functional as F

from fastllm.kernels import fused_linear_cross_entropy
from helpers import Constant, assert_caught, check, compare, planted


def _inputs(gen, tokens=(3, 11), embed=24, vocab=1000):
    hidden = torch.randn(*tokens, embed, generator=gen)
    weight = 0.3 * torch.randn(vocab, embed, generator=gen)
    targets = torch.randint(0, vocab, tokens, generator=gen)
    targets.view(-1)[:4] = -100
    return hidden, weight, targets


def _loss(**options):
    return lambda h, w, t, impl: fused_linear_cross_entropy(h, w, t, **options, impl=impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("z_loss,smoothing,reduction,chunk", [
    (0.0, 0.0, "mean", None), (1e-3, 0.1, "mean", 7), (0.0, 0.2, "sum", 5)])
def test_matches_reference(dtype, z_loss, smoothing, reduction, chunk, gen):
    inputs = _inputs(gen, vocab=4099 if chunk == 7 else 1000)  # > one vocab block
    compare(_loss(z_loss=z_loss, label_smoothing=smoothing, reduction=reduction, chunk_size=chunk), inputs, dtype)


def test_planted_mean_over_ignored_tokens_is_caught(gen):
    """The mean divided by every token, the 4 ignored ones included (29 valid of 33)."""
    hidden, weight, targets = _inputs(gen)
    wrong = lambda h, w, t, impl: _loss(reduction="sum")(h, w, t, impl=impl) / t.numel()  # noqa: E731
    assert_caught(planted(_loss(), wrong), (hidden, weight, targets), torch.float32)


def test_reference_is_torch_cross_entropy(gen):
    hidden, weight, targets = _inputs(gen)
    for smoothing in (0.0, 0.3):
        want = F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), targets.flatten(),
                               label_smoothing=smoothing)
        torch.testing.assert_close(fused_linear_cross_entropy(
            hidden, weight, targets, label_smoothing=smoothing, impl="torch"), want)


def test_float64_equals_reference_and_gradcheck(gen):
    hidden, weight, targets = _inputs(gen, tokens=(2, 3), embed=5, vocab=37)
    fn = _loss(z_loss=1e-2, label_smoothing=0.1, chunk_size=4)
    compare(fn, (hidden, weight, targets), torch.float64)
    hidden, weight = hidden.double().requires_grad_(), weight.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: fn(h, w, targets, impl="triton"), (hidden, weight), fast_mode=True)


def test_no_grad_forward_and_all_ignored(gen):
    hidden, weight, targets = _inputs(gen)
    with torch.no_grad():
        got = fused_linear_cross_entropy(hidden, weight, targets, impl="triton")
    check(got, fused_linear_cross_entropy(hidden.double(), weight.double(), targets, impl="torch"), what="loss")
    ignored = torch.full_like(targets, -100)
    assert fused_linear_cross_entropy(hidden, weight, ignored, impl="triton").item() == 0.0


def test_loss_mask_matches_reference(gen):
    hidden, weight, targets = _inputs(gen)
    mask = torch.rand(targets.shape, generator=gen)
    mask[1] = 0.0
    compare(lambda h, w, t, m, impl: fused_linear_cross_entropy(h, w, t, loss_mask=m, chunk_size=5, impl=impl),
            (hidden, weight, targets, Constant(mask)), torch.float32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_loss_mask_weights_tokens_like_nn_cross_entropy(impl, gen):
    from fastllm import nn

    hidden, weight, targets = _inputs(gen)
    mask = torch.rand(targets.shape, generator=gen)
    mask[1] = 0.0
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = fused_linear_cross_entropy(h, w, targets, loss_mask=mask, chunk_size=5, impl=impl)
    want, _ = nn.cross_entropy(torch.nn.functional.linear(hidden, weight), targets, loss_mask=mask)
    torch.testing.assert_close(got, want)
    got.backward()
    assert h.grad[1].abs().max() == 0  # fully masked row: no gradient
