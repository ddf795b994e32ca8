"""The fused attention paths on CUDA, forward AND backward, against the float64 reference.

Plain causal attention runs flash SDPA (bf16) or its fp32 kernels; sliding windows and packed
documents run FlexAttention, compiled, with a block mask. On CPU FlexAttention has no backward
(tests/kernels/test_attention.py checks its forward there), so this is where its backward is checked.
A sequence of 300 leaves the last 128-block partial; the first row holds three documents.
"""

import importlib

import pytest
import torch

from fastllm.kernels import attention
from helpers import compare

ATTENTION = importlib.import_module("fastllm.kernels.attention")
# (window, packed, dtype): each masked case is one FlexAttention compile, so bf16 once, with both masks
CASES = [(None, False, torch.float32), (None, False, torch.bfloat16), (100, False, torch.float32),
         (None, True, torch.float32), (100, True, torch.float32), (100, True, torch.bfloat16)]


def _inputs(gen, device, seq=300):
    q, k, v = (torch.randn(2, heads, seq, 64, generator=gen, dtype=torch.float64).to(device) for heads in (8, 2, 2))
    segments = torch.tensor([[0] * 90 + [1] * 150 + [2] * (seq - 240), [0] * seq], device=device)
    return q, k, v, segments


def _cuda_only_if_masked(window, packed):
    return [pytest.mark.cuda_only("FlexAttention has no CPU backward")] if window or packed else []


def _id(window, packed, dtype):
    mask = "+".join(name for name, on in (("window", window), ("packed", packed)) if on) or "causal"
    return f"{mask}-{ {torch.float32: 'fp32', torch.bfloat16: 'bf16'}[dtype]}"


@pytest.mark.parametrize("window,packed,dtype", [pytest.param(*case, marks=_cuda_only_if_masked(*case[:2]),
                                                              id=_id(*case)) for case in CASES])
def test_fused_attention_forward_and_backward(window, packed, dtype, gen, device, monkeypatch):
    reference_calls = []
    reference = ATTENTION.attention_reference

    def recording_reference(*args, **kwargs):
        reference_calls.append(kwargs)
        return reference(*args, **kwargs)

    def fn(q, k, v, segments, impl):
        before = len(reference_calls)
        out = attention(q, k, v, window=window, segment_ids=segments if packed else None, impl=impl)
        assert impl == "torch" or len(reference_calls) == before, "the fused path ran the reference"
        return out

    monkeypatch.setattr(ATTENTION, "attention_reference", recording_reference)
    compare(fn, _inputs(gen, device), dtype)
