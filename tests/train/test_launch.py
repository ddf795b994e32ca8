"""Start-up checks of a launch: each problem is one line naming what to change."""

from __future__ import annotations

import pytest

from types import SimpleNamespace

from fastllm.errors import UserError
from fastllm.train import launch
from fastllm.train.config import MeshSection, RunConfig


def Config(data: int = 1, tensor: int = 1, device: str = "auto"):  # the sections the checks read
    return SimpleNamespace(mesh=MeshSection(data=data, tensor=tensor), run=RunConfig(device=device))

TORCHRUN = {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "h",
            "MASTER_PORT": "1"}


def test_versions():
    launch._check_versions("2.13.0+cpu", (3, 11, 7))
    with pytest.raises(UserError, match=r"torch >= 2.11, this is 2.4.1"):
        launch._check_versions("2.4.1", (3, 11, 7))
    with pytest.raises(UserError, match=r"Python >= 3.10, this is 3.9.1"):
        launch._check_versions("2.13.0", (3, 9, 1))


def test_world_against_the_mesh():
    config = Config(data=2, tensor=2)
    launch._check_world(config, TORCHRUN)
    with pytest.raises(UserError, match="= 4 ranks, but the world has 1 .launch with torchrun --nproc-per-node 4"):
        launch._check_world(config, {})
    with pytest.raises(UserError, match="= 1 ranks, but the world has 4 .set mesh.data x mesh.tensor"):
        launch._check_world(Config(), TORCHRUN)
    with pytest.raises(UserError, match="MASTER_ADDR, MASTER_PORT unset"):
        launch._check_world(config, {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0"})


def test_gpus_per_node():
    config = Config(device="cuda")
    launch._check_gpus(config, {"LOCAL_WORLD_SIZE": "8"}, True, 8)
    with pytest.raises(UserError, match="8 processes on this node but it has 4 GPU"):
        launch._check_gpus(config, {"LOCAL_WORLD_SIZE": "8"}, True, 4)
    with pytest.raises(UserError, match="sees no CUDA device"):
        launch._check_gpus(config, {}, False, 0)
    launch._check_gpus(Config(), {"LOCAL_WORLD_SIZE": "8"}, False, 0)  # auto on a CPU machine: the CPU


def test_train_command_names_the_launch_problem(tmp_path, capsys, monkeypatch):
    from fastllm import cli

    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli.main(["train", "recipes/quickstart.py", f"run.dir={tmp_path}", "mesh.data=2",
                     "data.datasets=unused"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "launch with torchrun --nproc-per-node 2" in err


def test_slurm_script_launches_torchrun_per_node():
    import subprocess
    from pathlib import Path

    script = Path(__file__).parents[2] / "launchers" / "slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "srun torchrun" in text and '--rdzv-endpoint "$head_node:29500"' in text
    assert '-m fastllm train "$@"' in text
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True)  # no recipe: usage, status 2
    assert done.returncode == 2 and "usage: sbatch launchers/slurm.sbatch RECIPE.py" in done.stderr
