import pytest
import torch

from fastllm import nn
from fastllm.kernels import apply_rotary
from helpers import Constant, assert_caught, check, compare, planted


def _inputs(gen, head_dim=10, fraction=1.0, batch=2, heads=6, kv_heads=3, seq=5):
    """q as the projections' [b, h, s, d] view of [b, s, h, d]; cos/sin in float64 (compare rounds them)."""
    q = torch.randn(batch, seq, heads, head_dim, generator=gen).transpose(1, 2)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=gen)
    positions = torch.randint(0, 50, (batch, seq), generator=gen)
    cos, sin = nn.rotary.cos_sin(nn.Rotary(head_dim=head_dim, fraction=fraction), positions, dtype=torch.float64)
    return q, k, Constant(cos), Constant(sin)


def _rotary(q, k, cos, sin, impl):
    return apply_rotary(q, k, cos, sin, impl=impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,fraction", [(10, 1.0), (16, 0.25), (12, 0.5)])
def test_matches_reference(dtype, head_dim, fraction, gen):
    compare(_rotary, _inputs(gen, head_dim, fraction), dtype)


def test_planted_wrong_direction_is_caught(gen):
    """The forward rotating by -angle (sin negated: the backward's trick leaking into the forward)."""
    wrong = lambda q, k, cos, sin, impl: apply_rotary(q, k, cos, -sin, impl=impl)  # noqa: E731
    assert_caught(planted(_rotary, wrong), _inputs(gen, 16, 0.25), torch.float32)


def test_reference_equals_nn_rotary(gen):
    q, k, cos, sin = (x.tensor.float() if isinstance(x, Constant) else x for x in _inputs(gen, 16, 0.25))
    got = apply_rotary(q, k, cos, sin, impl="torch")
    torch.testing.assert_close(got[0], nn.rotary.apply(q, cos, sin))
    torch.testing.assert_close(got[1], nn.rotary.apply(k, cos, sin))


def test_inplace_overwrites_and_backpropagates(gen):
    q, k, cos, sin = (x.tensor.float() if isinstance(x, Constant) else x for x in _inputs(gen))
    q0, k0 = q.clone().requires_grad_(), k.clone().requires_grad_()
    qi, ki = q0 * 1, k0 * 1
    out = apply_rotary(qi, ki, cos, sin, inplace=True, impl="triton")
    assert out[0].data_ptr() == qi.data_ptr() and out[1].data_ptr() == ki.data_ptr()
    (out[0].sum() + 2 * out[1].sum()).backward()
    q1, k1 = q.double().requires_grad_(), k.double().requires_grad_()
    exact = apply_rotary(q1, k1, cos.double(), sin.double(), impl="torch")
    (exact[0].sum() + 2 * exact[1].sum()).backward()
    for name, got, want in (("q", out[0], exact[0]), ("k", out[1], exact[1]), ("dq", q0.grad, q1.grad),
                            ("dk", k0.grad, k1.grad)):
        check(got.detach(), want.detach(), what=name)


def test_float64_equals_reference_and_gradcheck(gen):
    inputs = _inputs(gen, 8, 0.5, batch=1, heads=2, kv_heads=1, seq=3)
    compare(_rotary, inputs, torch.float64)
    q, k, cos, sin = (x.tensor if isinstance(x, Constant) else x.double().requires_grad_() for x in inputs)
    assert torch.autograd.gradcheck(lambda q, k: _rotary(q, k, cos, sin, impl="triton"), (q, k), fast_mode=True)


def test_position_blocks_cut_short(gen):
    """Several position blocks per batch row, the last one partial, partial rotary tail untouched."""
    from fastllm.kernels import rotary

    q, k = torch.randn(2, 4, 11, 16, generator=gen), torch.randn(2, 2, 11, 16, generator=gen)
    cos, sin = torch.randn(1, 11, 12, generator=gen), torch.randn(1, 11, 12, generator=gen)
    q_out, k_out = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
    q_out[..., 12:], k_out[..., 12:] = q[..., 12:], k[..., 12:]
    rotary._launch(q, k, q_out, k_out, cos, sin, False, block_s=4, num_warps=4)
    want_q, want_k = rotary.apply_rotary_reference(q.double(), k.double(), cos.double(), sin.double())
    check(q_out, want_q, what="q")
    check(k_out, want_k, what="k")
