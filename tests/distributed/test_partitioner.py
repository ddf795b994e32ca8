"""Every layout trains like one process: tiny Llama and Qwen2 on 4 spawned gloo ranks.

Per layout (data=4 at ZeRO 1/2/3; tensor=4 with and without sequence parallelism; data=2 x
tensor=2 at ZeRO 3, with and without sequence parallelism; communication overlapped with compute,
as by default, and some layouts again synchronous and with remat), without gradient accumulation
and (five layouts of tiny Llama) with it; tiny Qwen2 (tied table, biases) on the five layouts that
split its table or heads differently:
sharded init equals the slice of the full init bitwise, gradients after step 1 and the losses of 5
AdamW steps (with clipping) match one process within 1e-5 relative, and each rank holds the bytes
``describe`` predicts. See partitioner_checks.py.
"""

import pytest

import partitioner_checks
from fastllm.sharding import testing

pytestmark = pytest.mark.distributed


EVERY = tuple(layout[0] for layout in partitioner_checks.LAYOUTS)


@pytest.mark.parametrize("preset, names, accumulated", [
    ("tiny-llama", EVERY, partitioner_checks.ACCUMULATED), ("tiny-qwen2", partitioner_checks.TIED, ())])
def test_every_layout_matches_one_process(preset, names, accumulated):
    reports = testing.run(partitioner_checks.matrix_checks, 4, preset, names, accumulated, timeout_s=400.0)
    expected = len(names) + len(accumulated)
    assert all(len(report) == expected for report in reports), "checks did not run"
    assert_all_ok_small(reports)


def assert_all_ok_small(reports):
    failures = [f"rank {rank} {name}:\n{outcome}" for rank, report in enumerate(reports)
                for name, outcome in report.items() if outcome != "ok"]
    assert not failures, "\n".join(failures)


def test_copy_engine_transport_refuses_gloo_with_the_reason():
    reports = testing.run(partitioner_checks.transport_checks, 2, timeout_s=120.0)
    assert reports and all(report == {"copy_engine on gloo": "ok"} for report in reports), reports
