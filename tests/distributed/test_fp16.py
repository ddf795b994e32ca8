"""fp16 with dynamic loss scaling at data=2 (ZeRO-1) trains as one process: the same losses and loss
scales, and a step whose gradients overflow on any rank is skipped on every rank (params unchanged,
the scale halved each time)."""

import fp16_checks
import pytest

from fastllm.sharding import testing

pytestmark = pytest.mark.distributed


def test_fp16_loss_scaling_at_data_2_matches_one_process():
    reports = testing.run(fp16_checks.fp16_on_two_data_ranks, 2, timeout_s=200.0)
    for report in reports:
        one, two = report["normal"]
        assert two["losses"] == pytest.approx(one["losses"], rel=1e-3)  # fp16 compute, another sum order
        assert two["scales"] == one["scales"] == [2.0**10] * 3
        assert two["moved"] > 0
        one, two = report["overflow"]
        assert two["scales"] == one["scales"] == [2.0**119, 2.0**118, 2.0**117]  # skipped everywhere
        assert two["moved"] == one["moved"] == 0.0
        assert report["one rank finite"] is False  # one rank's overflow skips the step everywhere
