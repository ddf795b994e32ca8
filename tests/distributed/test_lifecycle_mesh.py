"""The lifecycle on a mesh of spawned gloo ranks: a NaN on one rank is a skipped step on every rank;
a rank that hangs (alive, but never joining a collective) is named by the others."""

import math

import pytest

import lifecycle_checks
from fastllm import tree
from fastllm.config import apply_overrides
from fastllm.sharding import checkpoint as sharded
from fastllm.sharding import testing
from fastllm.train import checkpointing
from test_trainer_mesh import dataset, make_config  # noqa: F401 - the module's dataset fixture

pytestmark = pytest.mark.distributed


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path, dataset):
    """... with the checkpoints written in the background (their collectives on a group of their own)."""
    config = apply_overrides(make_config(tmp_path, dataset), ["mesh.data=2", "train.async_checkpoint=true"])
    reports = testing.run(lifecycle_checks.nan_on_one_rank, 2, config, timeout_s=300.0)
    for report in reports:
        assert report["skipped"] == [2] and report["unchanged_at_2"]
    assert reports[0]["final"] == reports[1]["final"]  # the replicas never parted
    assert all(math.isfinite(x) for leaf in reports[0]["final"] for x in leaf)
    _, saved = sharded.load_full(checkpointing.latest(tmp_path))
    assert [t.flatten().tolist() for t in tree.leaves(saved["params"])] == reports[0]["final"]


def test_a_hung_rank_is_named_within_the_timeout():
    reports = testing.run(lifecycle_checks.hang_and_blame, 2, 3.0, timeout_s=60.0)
    message, speaker = reports[0]
    assert message == ("error: rank 1 hangs (alive, but did not join a collective within run.timeout_s=3); "
                       "stopping (run the same command to resume from the newest checkpoint)")
    assert speaker and reports[1] is None
