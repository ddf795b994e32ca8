"""FP8 projections (``kernels.matmul="fp8"``) under data and tensor + sequence parallelism on 2 gloo
ranks: every projection takes the FP8 path on every rank, and 5 AdamW steps' losses stay within
FP8 rounding of one process (per-block scales, fp8_checks.py)."""

import pytest

import fp8_checks
from fastllm.sharding import testing

pytestmark = pytest.mark.distributed


def test_fp8_projections_train_like_one_process_under_layouts():
    reports = testing.run(fp8_checks.fp8_layouts, 2, timeout_s=240.0)
    for rank, report in enumerate(reports):
        for name, result in report.items():
            assert result["calls"] == 7 * 2, (rank, name, result)  # q k v o up gate down, 2 layers, forward only
            assert result["worst"] < 1e-3, (rank, name, result)  # measured: 3e-4 (data), 2e-4 (tensor)
