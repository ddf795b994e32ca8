"""Schedules evaluated at their knots, for Python-int and tensor steps alike."""

import math

import pytest
import torch

from fastllm.optim import schedules


def both(schedule, step):
    """The value at ``step`` for an int step, checked equal to the tensor-step value."""
    as_float = schedule(step)
    as_tensor = schedule(torch.tensor(step))
    assert isinstance(as_float, float) and isinstance(as_tensor, torch.Tensor)
    assert as_tensor.shape == () and as_tensor.item() == pytest.approx(as_float, rel=1e-12)
    return as_float


def test_constant():
    assert both(schedules.constant(3e-4), 0) == 3e-4
    assert both(schedules.constant(3e-4), 10**6) == 3e-4


def test_warmup_constant_knots():
    s = schedules.warmup_constant(1.0, warmup_steps=4)
    assert [both(s, k) for k in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_cosine_knots():
    s = schedules.cosine(2.0, total_steps=14, warmup_steps=4, min_ratio=0.1)
    assert both(s, 0) == pytest.approx(0.5)
    assert both(s, 3) == pytest.approx(2.0)
    assert both(s, 4) == pytest.approx(2.0)  # decay starts at the peak
    assert both(s, 9) == pytest.approx(0.2 + 1.8 * 0.5)  # half way: mid between peak and floor
    assert both(s, 6) == pytest.approx(0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert both(s, 14) == pytest.approx(0.2)
    assert both(s, 100) == pytest.approx(0.2)


def test_linear_decay_knots():
    s = schedules.linear_decay(1.0, total_steps=12, warmup_steps=2)
    assert [both(s, k) for k in (0, 1, 2, 7, 12, 20)] == pytest.approx([0.5, 1, 1, 0.5, 0, 0])


@pytest.mark.parametrize("shape, mid", [("linear", 0.5), ("cosine", 0.5), ("sqrt", 1 - 0.5**0.5)])
def test_wsd_knots(shape, mid):
    s = schedules.wsd(1.0, total_steps=20, warmup_steps=2, decay_steps=8, min_ratio=0.0, shape=shape)
    assert both(s, 0) == pytest.approx(0.5)
    assert both(s, 1) == both(s, 2) == both(s, 12) == pytest.approx(1.0)  # stable until 12
    assert both(s, 16) == pytest.approx(mid)
    assert both(s, 20) == pytest.approx(0.0)


def test_join_restarts_the_step_count_per_segment():
    s = schedules.join([schedules.warmup_constant(1.0, 2), schedules.linear_decay(0.5, 4)], [3])
    assert [both(s, k) for k in range(8)] == pytest.approx([0.5, 1, 1, 0.5, 0.375, 0.25, 0.125, 0])


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="total_steps"):
        schedules.cosine(1.0, total_steps=5, warmup_steps=10)
    with pytest.raises(ValueError, match="min_ratio"):
        schedules.linear_decay(1.0, 10, min_ratio=2.0)
    with pytest.raises(ValueError, match="total_steps"):
        schedules.wsd(1.0, total_steps=10, warmup_steps=5, decay_steps=6)
