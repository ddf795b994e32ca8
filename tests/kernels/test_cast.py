import pytest
import torch

from fastllm.kernels import cast, sum_rows


@pytest.mark.parametrize("source, target", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                            (torch.float32, torch.bfloat16)])  # the last: narrowing, torch's
def test_cast_equals_torch(source, target, gen):
    x = (torch.randn(3, 8195, generator=gen) * 100).to(source)  # not a multiple of the block
    got = cast(x, target, impl="triton")
    assert got.dtype == target and got.shape == x.shape
    assert torch.equal(got, x.to(target))


def test_cast_same_dtype_non_contiguous_and_bad_dtype(gen):
    x = torch.randn(64, 32, generator=gen).to(torch.bfloat16)
    assert cast(x, torch.bfloat16, impl="triton") is x
    transposed = x.t()
    assert torch.equal(cast(transposed, torch.float32, impl="triton"), transposed.float())
    with pytest.raises(ValueError, match="not a floating-point dtype"):
        cast(x, torch.int32)


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("source, target", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                            (torch.bfloat16, torch.bfloat16)])
def test_sum_rows_accumulates_in_float32_in_row_order(n, source, target, gen):
    rows = (torch.randn(n, 8195, generator=gen) * 100).to(source)  # a width that is not a multiple of the block
    expected = rows[0].float()
    for row in rows[1:]:
        expected = expected + row.float()
    got = sum_rows(rows, target, impl="triton")
    assert got.dtype == target and torch.equal(got, expected.to(target))
    assert torch.equal(sum_rows(rows, target, impl="torch"), expected.to(target))


def test_planted_row_order_is_caught(gen):
    """The same sum in the reverse order of rows: another rounding, which torch.equal must see (the
    copy-engine reduce-scatter needs every rank to add the blocks in one order)."""
    rows = (torch.randn(4, 8195, generator=gen) * 100).to(torch.bfloat16)
    expected = rows[0].float() + rows[1].float() + rows[2].float() + rows[3].float()
    assert torch.equal(sum_rows(rows, torch.float32, impl="triton"), expected)
    assert not torch.equal(sum_rows(rows.flip(0), torch.float32, impl="triton"), expected)


def test_sum_rows_strided_rows_out_and_errors(gen):
    buffer = torch.randn(3, 2, 1000, generator=gen).to(torch.bfloat16)
    rows = buffer[:, 1, :700]  # rows of a larger buffer (the receive slots of one part)
    out = torch.empty(700)
    assert sum_rows(rows, torch.float32, out=out, impl="triton") is out
    assert torch.equal(out, rows[0].float() + rows[1].float() + rows[2].float())
    with pytest.raises(ValueError, match="out must be"):
        sum_rows(rows, torch.float32, out=torch.empty(699), impl="triton")
    with pytest.raises(ValueError, match="2-D float"):
        sum_rows(rows, torch.int32)
