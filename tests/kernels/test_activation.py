import pytest
import torch

from fastllm.kernels import ACTIVATIONS, activation, gated
from fastllm.nn.mlp import activation as nn_activation
from helpers import assert_caught, compare, planted


def _gated(name, recompute=True):
    return lambda g, u, impl: gated(g, u, name, recompute=recompute, impl=impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("recompute", [True, False])
def test_gated_matches_reference(name, dtype, recompute, gen):
    gate, up = torch.randn(3, 1100, generator=gen), torch.randn(3, 1100, generator=gen)  # > one block, odd
    compare(_gated(name, recompute), (gate, up), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_plain_matches_reference_and_nn(name, dtype, gen):
    x = torch.randn(5, 37, generator=gen)
    compare(lambda x, impl: activation(x, name, impl=impl), (x,), dtype)
    x = x.to(dtype)
    torch.testing.assert_close(activation(x, name, impl="torch"), nn_activation(name)(x))


def test_planted_approximation_is_caught(gen):
    """GeGLU with the tanh approximation in place of the exact erf GELU (< 5e-4 apart on these inputs)."""
    gate, up = torch.randn(3, 1100, generator=gen), torch.randn(3, 1100, generator=gen)
    assert_caught(planted(_gated("gelu"), _gated("gelu_tanh")), (gate, up), torch.float32)


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh"])
def test_float64_equals_reference_and_gradcheck(name, gen):
    g, u = torch.randn(4, 9, generator=gen, dtype=torch.float64), torch.randn(4, 9, generator=gen, dtype=torch.float64)
    for recompute in (True, False):
        compare(_gated(name, recompute), (g, u), torch.float64)
        leaves = (g.clone().requires_grad_(), u.clone().requires_grad_())
        assert torch.autograd.gradcheck(lambda g, u: _gated(name, recompute)(g, u, impl="triton"), leaves,
                                        fast_mode=True)


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="swish"):
        gated(torch.ones(2), torch.ones(2), "swish", impl="torch")
