"""``fastllm train`` under torchrun on 2 and 4 gloo ranks: a SIGKILLed rank is named by the survivor
at once, a frozen one when ``run.timeout_s`` ran out, and the run resumes on one process with the
same global batch and losses;
SIGTERM to one rank stops every rank at one agreed step with one checkpoint (exit 0) and the run
continues bit for bit; runs exit 0 on every rank (they used to end with SIGABRT), and a NaN on one
rank is a skipped step on every rank.

``FASTLLM_CLEAN_EXITS=50`` runs 50 runs of 2 and of 4 ranks instead of one of 4 (by hand: slow).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from lifecycle_world import (Launch, assert_same_state, build_dataset, checkpoint_steps, logged_steps, resumed_from,
                             run, rank_pids, train_command, training, wait_for, write_recipe)

pytestmark = pytest.mark.distributed
OVERRIDES = ("train.steps=8",)
TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    data = build_dataset(root / "world")
    recipes = {"plain": write_recipe(root / "plain.py", data),
               "slow": write_recipe(root / "slow.py", data, step_sleep=0.5),
               "nan on rank 1": write_recipe(root / "nan.py", data, bad=[3], bad_rank=1)}
    reference = root / "reference"  # 2 ranks, in one go
    done = run(train_command(recipes["plain"], reference, *OVERRIDES, ranks=2))
    assert done.returncode == 0, done.stderr[-3000:]
    return root, recipes, reference


def _said(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("fastllm train: ")]


def test_a_killed_rank_is_named_and_the_run_resumes_on_one_process(world):
    root, recipes, reference = world
    run_dir = root / "killed"
    launch = Launch(train_command(recipes["slow"], run_dir, *OVERRIDES, f"run.timeout_s={TIMEOUT_S}", ranks=2),
                    root / "killed.log")
    try:
        wait_for(lambda: any(step >= 4 for step in checkpoint_steps(run_dir)), what="the checkpoint of step 4")
        os.kill(rank_pids(launch.process.pid)[1], signal.SIGKILL)
        killed = time.monotonic()
        code = launch.wait(TIMEOUT_S + 30)
        took = time.monotonic() - killed
    finally:
        launch.stop()
    output = launch.output()
    assert code != 0 and took < TIMEOUT_S, (took, output[-3000:])
    assert _said(output) == ["fastllm train: error: rank 1 died (no heartbeat for 3 s: killed, crashed or frozen); "
                             "stopping (run the same command to resume from the newest checkpoint)"], output[-3000:]
    assert "fastllm/" not in output  # no traceback of ours (torchrun prints its own)

    saved = checkpoint_steps(run_dir)[-1]
    again = run(train_command(recipes["plain"], run_dir, *OVERRIDES))  # one process, the same global batch
    assert again.returncode == 0 and resumed_from(again.stdout) == [saved], again.stderr[-3000:]
    got, want = training(run_dir), training(reference)
    assert [line[0] for line in got] == [line[0] for line in want] == list(range(1, 9))
    assert got[:saved] == want[:saved]  # the 2-rank steps, bit for bit
    assert [line[1] for line in got[saved:]] == pytest.approx([line[1] for line in want[saved:]], rel=1e-5)


def test_a_frozen_rank_is_named_within_the_timeout(world):
    """SIGSTOP: the rank neither dies nor answers; the survivor's collective runs into
    ``run.timeout_s`` and it names the rank whose heartbeat stood still."""
    root, recipes, _ = world
    run_dir, timeout_s = root / "frozen", 5.0
    launch = Launch(train_command(recipes["slow"], run_dir, *OVERRIDES, f"run.timeout_s={timeout_s}", ranks=2),
                    root / "frozen.log")
    try:
        wait_for(lambda: logged_steps(run_dir) >= 2, what="two steps")
        frozen = rank_pids(launch.process.pid)[1]
        os.kill(frozen, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_for(lambda: any(line.startswith("fastllm train: ") for line in launch.output().splitlines()),
                 timeout=timeout_s + 30, what="the survivor's verdict")
        took = time.monotonic() - stopped
        os.kill(frozen, signal.SIGKILL)  # torchrun waits for it; a frozen process takes only this
        launch.wait(60)
    finally:
        launch.stop()
    assert timeout_s < took < timeout_s + 10, took
    assert _said(launch.output()) == ["fastllm train: error: rank 1 died (no heartbeat for 3 s: killed, crashed or "
                                      "frozen); stopping (run the same command to resume from the newest checkpoint)"]


def test_sigterm_to_one_rank_stops_every_rank_at_one_step(world):
    root, recipes, reference = world
    run_dir = root / "sigterm"
    command = train_command(recipes["slow"], run_dir, *OVERRIDES, "train.checkpoint_every=0", ranks=2)
    launch = Launch(command, root / "sigterm.log")
    try:
        wait_for(lambda: logged_steps(run_dir) >= 2, what="two steps")
        os.kill(rank_pids(launch.process.pid)[1], signal.SIGTERM)
        code = launch.wait(60)
    finally:
        launch.stop()
    output = launch.output()
    saved = checkpoint_steps(run_dir)
    assert code == 0 and len(saved) == 1 and saved[0] < 8, output[-3000:]
    assert _said(output) == [f"fastllm train: stopped by SIGTERM after step {saved[0]}; checkpoint saved to "
                             f"{run_dir / 'checkpoints' / f'step-{saved[0]:08d}'} (run the same command to resume)"]
    rank1 = (run_dir / "metrics.rank1.jsonl").read_text().splitlines()
    assert logged_steps(run_dir) == len(rank1) == saved[0]  # both ranks stopped after the same step

    again = run(train_command(recipes["plain"], run_dir, *OVERRIDES, "train.checkpoint_every=0", ranks=2))
    assert again.returncode == 0 and resumed_from(again.stdout) == saved, again.stderr[-3000:]
    assert training(run_dir) == training(reference)
    assert_same_state(run_dir, reference)


def test_runs_exit_cleanly_on_every_rank_and_a_nan_on_one_rank_is_skipped_by_all(world):
    root, recipes, _ = world
    runs = int(os.environ.get("FASTLLM_CLEAN_EXITS", "0"))
    plan = [(2, i) for i in range(runs)] + [(4, i) for i in range(runs)] if runs else [(4, 0)]
    failed = []
    for ranks, i in plan:
        run_dir = root / f"clean-{ranks}-{i}"
        done = run(train_command(recipes["nan on rank 1"], run_dir, "train.steps=4", "train.batch_size=4", ranks=ranks),
                   timeout=300)
        output = done.stdout + done.stderr
        if done.returncode != 0 or "terminate called" in output:
            failed.append(f"{ranks} ranks, run {i}: exit {done.returncode}\n{output[-2000:]}")
            continue
        for log in ("metrics.jsonl", "metrics.rank1.jsonl"):
            skipped = [line for line in (run_dir / log).read_text().splitlines() if '"skipped": 1' in line]
            assert len(skipped) == 1 and skipped[0].startswith('{"step": 3,'), log
    print(f"clean exits: {len(plan) - len(failed)} of {len(plan)} runs")
    assert not failed, "\n\n".join(failed)
