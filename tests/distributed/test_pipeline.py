"""Pipelines train like one process: every schedule at pipe=2 and pipe=4, with data, tensor and
ZeRO around them at 4 and 8 spawned gloo ranks (see partitioner_checks.PIPELINE_LAYOUTS): the
losses, the logged grad norms, the final parameters and every optimizer moment match one process
within 1e-5 relative, each rank holds the bytes ``describe`` predicts for its stage, the executor
ran exactly the printed schedule, and tiny Qwen2's tied embedding has the same bits on the first
and the last stage after every step."""

import pytest

import partitioner_checks
from fastllm.sharding import testing

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world, preset", [(2, "tiny-llama"), (2, "tiny-qwen2"), (4, "tiny-qwen2"), (8, "tiny-llama")])
def test_every_pipeline_layout_matches_one_process(world, preset, monkeypatch):
    grad_accums = (1, 2) if (world, preset) == (2, "tiny-llama") else (1,)
    if world == 8:  # 8 ranks on 2 cores: without the runtime type checks (the smaller worlds keep them)
        monkeypatch.setenv("FASTLLM_TYPECHECK", "0")
    reports = testing.run(partitioner_checks.pipeline_checks, world, preset, grad_accums, timeout_s=600.0)
    expected = len(partitioner_checks.PIPELINE_LAYOUTS[world]) * len(grad_accums)
    assert reports and all(len(report) == expected for report in reports), "checks did not run"
    failures = [f"rank {rank} {name}:\n{outcome}" for rank, report in enumerate(reports)
                for name, outcome in report.items() if outcome != "ok"]
    assert not failures, "\n".join(failures)
