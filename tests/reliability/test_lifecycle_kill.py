"""A real ``fastllm train`` process, SIGKILLed ten times at random points (during start-up, inside
steps, inside checkpoint writes) and started again each time with the same command, ends with the
losses, params and optimizer state of a run that was never interrupted, bit for bit (CPU, fp32);
every start after the first checkpoint resumes from the newest one."""

from __future__ import annotations

import random
import signal
import time

from lifecycle_world import (Launch, assert_same_state, build_dataset, checkpoint_steps, run, resumed_from,
                             train_command, training, wait_for, write_recipe)

STEPS, KILLS = 24, 10
OVERRIDES = [f"train.steps={STEPS}", "train.checkpoint_every=1"]


def _newest_logged(run_dir) -> int:
    lines = training(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    return lines[-1][0] if lines else 0


def _writing(run_dir, step: int) -> list:
    return list((run_dir / "checkpoints").glob(f"step-{step:08d}.tmp-*"))


def _kill(kind: str, launch: Launch, run_dir, base: int, rng: random.Random) -> bool:
    """SIGKILL ``launch`` at a point of ``kind``; True when it died inside a checkpoint write."""
    target = min(base + rng.randint(1, 3), STEPS - 1)
    if kind == "start-up":  # importing, restoring, rewriting the log, before or at the first step
        time.sleep(max(0.0, launch.started + rng.uniform(0.05, 2.5) - time.monotonic()))
    elif kind == "step":
        wait_for(lambda: _newest_logged(run_dir) >= target, what=f"step {target}")
    else:
        wait_for(lambda: bool(_writing(run_dir, target)), what=f"the checkpoint write of step {target}",
                 interval=0.001)  # a write takes milliseconds
    launch.process.send_signal(signal.SIGKILL)
    launch.wait()
    return kind == "write" and bool(_writing(run_dir, target))


def test_killed_ten_times_the_run_ends_as_if_never_interrupted(tmp_path):
    data = build_dataset(tmp_path / "world")
    recipe = write_recipe(tmp_path / "recipe.py", data)
    reference, run_dir = tmp_path / "reference", tmp_path / "killed"
    done = run(train_command(recipe, reference, *OVERRIDES))
    assert done.returncode == 0, done.stderr[-2000:]

    rng, writes_hit = random.Random(14), 0
    for i, kind in enumerate((["start-up", "step", "write"] * 4)[:KILLS]):
        before = checkpoint_steps(run_dir)
        base = before[-1] if before else 0
        launch = Launch(train_command(recipe, run_dir, *OVERRIDES), tmp_path / f"launch-{i}.log")
        try:
            writes_hit += _kill(kind, launch, run_dir, base, rng)
        finally:
            launch.stop()
        assert launch.process.returncode == -signal.SIGKILL, launch.output()[-2000:]
        restored = resumed_from(launch.output())
        if kind != "start-up":  # it trained, so it restored first: the newest checkpoint
            assert restored == ([base] if before else []), (i, kind, before, launch.output()[-2000:])
        else:
            assert restored in ([], [base] if before else []), (i, launch.output()[-2000:])

    before = checkpoint_steps(run_dir)
    final = run(train_command(recipe, run_dir, *OVERRIDES))
    assert final.returncode == 0, final.stderr[-2000:]
    assert resumed_from(final.stdout) == [before[-1]] and before[-1] > 0
    assert writes_hit >= 1, "no kill landed inside a checkpoint write"
    assert training(run_dir) == training(reference)
    assert_same_state(run_dir, reference)
    assert not list((run_dir / "checkpoints").glob("*.tmp-*"))  # crashed writes' leftovers are cleared
