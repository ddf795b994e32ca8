"""Collectives, mesh groups and shard layouts in spawned gloo ranks, against one-rank references.

Spawning ranks costs seconds each on 2 shared cores, so each test runs many checks in one spawn
and reports every failing check with its rank and traceback.
"""

import pytest

import collective_checks
from fastllm.sharding import testing

pytestmark = pytest.mark.distributed


def assert_all_ok(reports: list[dict[str, str]]) -> None:
    failures = [
        f"rank {rank} {name}:\n{outcome}"
        for rank, report in enumerate(reports)
        for name, outcome in report.items()
        if outcome != "ok"
    ]
    assert reports and all(len(report) > 10 for report in reports), "checks did not run"
    assert not failures, "\n".join(failures)


def test_world_2():
    assert_all_ok(testing.run(collective_checks.world_2_checks, 2))


def test_world_4_two_meshes():
    specs = [("data", None, "tensor"), (("data", "tensor"), None), (None, ("tensor", "data")), (None, None), ("tensor",)]
    assert_all_ok(testing.run(collective_checks.world_4_checks, 4, specs))


def test_rank_exception_is_reraised_with_traceback():
    with pytest.raises(testing.DistributedTestError, match="(?s)rank 1 of 2 raised.*raise_on_rank_one.*boom on purpose"):
        testing.run(collective_checks.raise_on_rank_one, 2)


def test_hung_rank_times_out():
    # Rank 0 may itself still be starting when the deadline passes on a loaded machine.
    with pytest.raises(testing.DistributedTestError, match=r"ranks \[(0, )?1\] did not finish"):
        testing.run(collective_checks.hang_on_rank_one, 2, timeout_s=8.0)
