"""A writer killed (SIGKILL) in the middle of a save never leaves a checkpoint that looks complete.

A forked child process pauses inside ``save`` at a chosen stage (private ``_hook``), announces it
with a file, and the parent kills it there: deterministic, no timing guesses.
"""

import multiprocessing
import os
import signal
import time

import pytest
import torch

from fastllm import checkpoint

def child_save(run, stage):
    """In the forked child: save step 2, pausing forever once ``stage`` is reached."""

    def hook(reached):
        if reached == stage:
            (run / "paused").write_text(reached)
            time.sleep(300)

    gen = torch.Generator().manual_seed(2)
    trees = {"params": {"w": torch.randn(512, 1024, generator=gen)},
             "opt_state": {"mu": torch.randn(512, 1024, generator=gen), "count": 2}}
    checkpoint.save(checkpoint.step_dir(run, 2), trees, {"step": 2}, _hook=hook)


def kill_child_at(run, stage):
    """Fork a writer (fork: no second torch import), SIGKILL it at ``stage``; its tmp dir."""
    child = multiprocessing.get_context("fork").Process(target=child_save, args=(run, stage))
    child.start()
    deadline = time.monotonic() + 60
    try:
        while not (run / "paused").exists():
            if not child.is_alive():
                pytest.fail(f"writer exited early with code {child.exitcode}")
            if time.monotonic() > deadline:
                pytest.fail(f"writer never reached {stage!r}")
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=30)
        assert child.exitcode == -signal.SIGKILL
    finally:
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
            child.join()
    (run / "paused").unlink()
    return run / f"step-00000002.tmp-{child.pid}"


@pytest.mark.parametrize("stage", ["tmp_created", "wrote:params", "before_complete", "before_rename"])
def test_killed_writer_leaves_previous_checkpoint_intact(tmp_path, stage):
    previous = {"params": {"w": torch.arange(6.0).reshape(2, 3)}, "opt_state": {"count": 1}}
    checkpoint.save(checkpoint.step_dir(tmp_path, 1), previous, {"step": 1})

    leftover = kill_child_at(tmp_path, stage)

    assert leftover.is_dir()  # the child really was writing step 2 when it died
    assert not checkpoint.step_dir(tmp_path, 2).exists()
    assert checkpoint.latest(tmp_path) == checkpoint.step_dir(tmp_path, 1)
    trees, metadata = checkpoint.load(checkpoint.latest(tmp_path))
    assert metadata == {"step": 1} and trees["opt_state"]["count"] == 1
    assert torch.equal(trees["params"]["w"], previous["params"]["w"])
    if stage != "before_rename":  # the marker comes last, so the leftover is refused outright
        with pytest.raises(checkpoint.CheckpointError, match=f"{leftover.name} is incomplete"):
            checkpoint.load(leftover)

    # the run goes on: the next save succeeds beside the leftover, which prune can clear
    checkpoint.save(checkpoint.step_dir(tmp_path, 2), {"params": {"w": torch.ones(1)}})
    assert checkpoint.latest(tmp_path) == checkpoint.step_dir(tmp_path, 2)
    checkpoint.prune(tmp_path, keep=2, remove_partial=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001", "step-00000002"]
