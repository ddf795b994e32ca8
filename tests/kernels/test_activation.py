import pytest
import torch

from fastllm.kernels import ACTIVATIONS, activation, gated
from fastllm.nn.mlp import activation as nn_activation
from helpers import compare


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("recompute", [True, False])
def test_gated_matches_reference(name, dtype, recompute):
    gate, up = torch.randn(3, 1100).to(dtype), torch.randn(3, 1100).to(dtype)  # > one block, odd
    compare(lambda g, u, impl: gated(g, u, name, recompute=recompute, impl=impl), (gate, up), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_plain_matches_reference_and_nn(name, dtype):
    x = torch.randn(5, 37).to(dtype)
    compare(lambda x, impl: activation(x, name, impl=impl), (x,), dtype)
    torch.testing.assert_close(activation(x, name, impl="torch"), nn_activation(name)(x))


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh"])
def test_gradcheck_float64(name):
    g = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    u = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    for recompute in (True, False):
        assert torch.autograd.gradcheck(lambda g, u: gated(g, u, name, recompute=recompute, impl="triton"), (g, u), fast_mode=True)


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="swish"):
        gated(torch.ones(2), torch.ones(2), "swish", impl="torch")
