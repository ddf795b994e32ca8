import pytest
import torch

from fastllm.kernels import attention
from fastllm.nn.attention import dot_product_attention


@pytest.mark.parametrize("window,packed", [(None, False), (5, False), (None, True), (4, True)])
def test_fused_paths_equal_the_nn_reference(window, packed):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 19, 8, generator=gen) for h in (4, 2, 2))
    segments = torch.tensor([[0] * 7 + [1] * 12, [0] * 19]) if packed else None
    want = dot_product_attention(q, k, v, window=window, segment_ids=segments)
    torch.testing.assert_close(attention(q, k, v, window=window, segment_ids=segments, impl="torch"), want)
    # FlexAttention has no CPU backward: the masked fused path is checked forward-only here
    got = attention(q, k, v, window=window, segment_ids=segments, impl="triton")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
