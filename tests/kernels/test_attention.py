"""The fused attention paths ("triton": flash SDPA, FlexAttention) against the float64 reference.

On CPU, plain causal attention (SDPA) is checked forward and backward; FlexAttention (sliding
windows, packed documents) runs unfused and forward only here, since it refuses a backward on CPU.
Its backward, compiled, is in the GPU suite (tests/gpu/test_attention_gpu.py).
"""

import pytest
import torch

from fastllm.kernels import attention
from fastllm.nn.attention import dot_product_attention
from helpers import assert_caught, compare, planted

MASKS = {"causal": (None, False), "window": (5, False), "packed": (None, True), "window+packed": (4, True)}


def _inputs(gen, seq=19):
    """q with 4 heads, k and v with 2 (grouped-query), and two documents in the first row."""
    q, k, v = (torch.randn(2, heads, seq, 8, generator=gen) for heads in (4, 2, 2))
    return q, k, v, torch.tensor([[0] * 7 + [1] * (seq - 7), [0] * seq])


def _attention(window, packed):
    return lambda q, k, v, segments, impl: attention(
        q, k, v, window=window, segment_ids=segments if packed else None, impl=impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", MASKS)
def test_fused_paths_match_reference(mask, dtype, gen):
    window, packed = MASKS[mask]
    compare(_attention(window, packed), _inputs(gen), dtype, grad=mask == "causal")


def test_planted_window_off_by_one_is_caught(gen):
    """A window that also admits the key ``window`` positions back (``<=`` for ``<``)."""
    assert_caught(planted(_attention(5, False), _attention(6, False)), _inputs(gen), torch.float32, grad=False)


@pytest.mark.parametrize("mask", MASKS)
def test_reference_equals_the_nn_attention(mask, gen):
    window, packed = MASKS[mask]
    q, k, v, segments = _inputs(gen)
    segments = segments if packed else None
    want = dot_product_attention(q, k, v, window=window, segment_ids=segments)
    torch.testing.assert_close(attention(q, k, v, window=window, segment_ids=segments, impl="torch"), want)
