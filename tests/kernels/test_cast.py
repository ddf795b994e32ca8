import pytest
import torch

from fastllm.kernels import cast


@pytest.mark.parametrize("source, target", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                            (torch.float32, torch.bfloat16)])  # the last: narrowing, torch's
def test_cast_equals_torch(source, target):
    x = (torch.randn(3, 8195) * 100).to(source)  # not a multiple of the block
    got = cast(x, target, impl="triton")
    assert got.dtype == target and got.shape == x.shape
    assert torch.equal(got, x.to(target))


def test_cast_same_dtype_non_contiguous_and_bad_dtype():
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    assert cast(x, torch.bfloat16, impl="triton") is x
    transposed = x.t()
    assert torch.equal(cast(transposed, torch.float32, impl="triton"), transposed.float())
    with pytest.raises(ValueError, match="not a floating-point dtype"):
        cast(x, torch.int32)
