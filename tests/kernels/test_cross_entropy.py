import pytest
import torch
import torch.nn.functional as F

from fastllm.kernels import fused_linear_cross_entropy
from helpers import TOLERANCE, compare


def _inputs(dtype, tokens=(3, 11), embed=24, vocab=1000):
    hidden = torch.randn(*tokens, embed).to(dtype)
    weight = (0.3 * torch.randn(vocab, embed)).to(dtype)
    targets = torch.randint(0, vocab, tokens)
    targets.view(-1)[:4] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("z_loss,smoothing,reduction,chunk", [
    (0.0, 0.0, "mean", None), (1e-3, 0.1, "mean", 7), (0.0, 0.2, "sum", 5)])
def test_matches_reference(dtype, z_loss, smoothing, reduction, chunk):
    hidden, weight, targets = _inputs(dtype, vocab=4099 if chunk == 7 else 1000)  # > one vocab block
    tol = TOLERANCE[dtype] if dtype != torch.bfloat16 else dict(rtol=3e-2, atol=3e-3)
    compare(lambda h, w, impl: fused_linear_cross_entropy(
        h, w, targets, z_loss=z_loss, label_smoothing=smoothing, reduction=reduction,
        chunk_size=chunk, impl=impl), (hidden, weight), dtype, tol)


def test_reference_is_torch_cross_entropy():
    hidden, weight, targets = _inputs(torch.float32)
    for smoothing in (0.0, 0.3):
        want = F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), targets.flatten(),
                               label_smoothing=smoothing)
        torch.testing.assert_close(fused_linear_cross_entropy(
            hidden, weight, targets, label_smoothing=smoothing, impl="torch"), want)


def test_gradcheck_float64():
    hidden, weight, targets = _inputs(torch.float64, tokens=(2, 3), embed=5, vocab=37)
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    fn = lambda h, w: fused_linear_cross_entropy(h, w, targets, z_loss=1e-2, label_smoothing=0.1,  # noqa: E731
                                                 chunk_size=4, impl="triton")
    assert torch.autograd.gradcheck(fn, (hidden, weight), fast_mode=True)


def test_no_grad_forward_and_all_ignored():
    hidden, weight, targets = _inputs(torch.float32)
    with torch.no_grad():
        got = fused_linear_cross_entropy(hidden, weight, targets, impl="triton")
    torch.testing.assert_close(got, fused_linear_cross_entropy(hidden, weight, targets, impl="torch"))
    ignored = torch.full_like(targets, -100)
    assert fused_linear_cross_entropy(hidden, weight, ignored, impl="triton").item() == 0.0


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_loss_mask_weights_tokens_like_nn_cross_entropy(impl):
    from fastllm import nn

    hidden, weight, targets = _inputs(torch.float32)
    mask = torch.rand(targets.shape)
    mask[1] = 0.0
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = fused_linear_cross_entropy(h, w, targets, loss_mask=mask, chunk_size=5, impl=impl)
    want, _ = nn.cross_entropy(torch.nn.functional.linear(hidden, weight), targets, loss_mask=mask)
    torch.testing.assert_close(got, want)
    got.backward()
    assert h.grad[1].abs().max() == 0  # fully masked row: no gradient
