import pytest
import torch

from fastllm import nn
from fastllm.kernels import apply_rotary
from helpers import compare


def _inputs(dtype, head_dim=10, fraction=1.0, batch=2, heads=6, kv_heads=3, seq=5):
    q = torch.randn(batch, seq, heads, head_dim).transpose(1, 2).to(dtype)  # the projections' view
    k = torch.randn(batch, kv_heads, seq, head_dim).to(dtype)
    positions = torch.randint(0, 50, (batch, seq))
    cos, sin = nn.rotary.cos_sin(nn.Rotary(head_dim=head_dim, fraction=fraction), positions, dtype=dtype)
    return q, k, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,fraction", [(10, 1.0), (16, 0.25), (12, 0.5)])
def test_matches_reference(dtype, head_dim, fraction):
    q, k, cos, sin = _inputs(dtype, head_dim, fraction)
    compare(lambda q, k, impl: apply_rotary(q, k, cos, sin, impl=impl), (q, k), dtype)


def test_reference_equals_nn_rotary():
    q, k, cos, sin = _inputs(torch.float32, 16, 0.25)
    got = apply_rotary(q, k, cos, sin, impl="triton")
    torch.testing.assert_close(got[0], nn.rotary.apply(q, cos, sin))
    torch.testing.assert_close(got[1], nn.rotary.apply(k, cos, sin))


def test_inplace_overwrites_and_backpropagates():
    q, k, cos, sin = _inputs(torch.float32)
    q0, k0 = q.clone().requires_grad_(), k.clone().requires_grad_()
    qi, ki = q0 * 1, k0 * 1
    out = apply_rotary(qi, ki, cos, sin, inplace=True, impl="triton")
    assert out[0].data_ptr() == qi.data_ptr()
    want = apply_rotary(q, k, cos, sin, impl="torch")
    torch.testing.assert_close(out[0], want[0])
    (out[0].sum() + 2 * out[1].sum()).backward()
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    ref = apply_rotary(q1, k1, cos, sin, impl="torch")
    (ref[0].sum() + 2 * ref[1].sum()).backward()
    torch.testing.assert_close(q0.grad, q1.grad)
    torch.testing.assert_close(k0.grad, k1.grad)


def test_gradcheck_float64():
    q, k, cos, sin = _inputs(torch.float64, 8, 0.5, batch=1, heads=2, kv_heads=1, seq=3)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k: apply_rotary(q, k, cos, sin, impl="triton"), (q, k), fast_mode=True)


def test_position_blocks_cut_short():
    """Several position blocks per batch row, the last one partial, partial rotary tail untouched."""
    from fastllm.kernels import rotary

    q, k = torch.randn(2, 4, 11, 16), torch.randn(2, 2, 11, 16)
    cos, sin = torch.randn(1, 11, 12), torch.randn(1, 11, 12)
    q_out, k_out = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
    q_out[..., 12:], k_out[..., 12:] = q[..., 12:], k[..., 12:]
    rotary._launch(q, k, q_out, k_out, cos, sin, False, block_s=4, num_warps=4)
    want_q, want_k = rotary.apply_rotary_reference(q, k, cos, sin)
    torch.testing.assert_close(q_out, want_q)
    torch.testing.assert_close(k_out, want_k)
