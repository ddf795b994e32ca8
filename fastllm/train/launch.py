"""Start-up checks of a launch, before any process group forms: each problem is one line saying
what to change (a UserError), instead of a hang in the first collective or a CUDA error later.

Checked: the Python and torch versions fastllm needs; the process count torchrun started against
``mesh.data x mesh.tensor x mesh.pipe``; torchrun's rank variables; and, for a CUDA run, the
processes on this node against its GPUs. docs/launching.md shows the launch commands.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any, Optional

from fastllm.errors import UserError

__all__ = ["check_launch", "MIN_TORCH", "MIN_PYTHON"]

MIN_PYTHON = (3, 10)
MIN_TORCH = (2, 11)


def _version(text: str) -> tuple[int, ...]:
    numbers = []
    for part in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        numbers.append(int(digits or 0))
    return tuple(numbers)


def _check_versions(torch_version: str, python: tuple[int, ...]) -> None:
    if tuple(python[:2]) < MIN_PYTHON:
        raise UserError(f"fastllm needs Python >= {'.'.join(map(str, MIN_PYTHON))}, this is "
                        f"{'.'.join(map(str, python[:3]))}")
    if _version(torch_version) < MIN_TORCH:
        raise UserError(f"fastllm needs torch >= {'.'.join(map(str, MIN_TORCH))}, this is {torch_version} "
                        "(pip install torch==2.13.0)")


def _check_world(config: Any, env: Mapping[str, str]) -> None:
    m = config.mesh
    world, size = int(env.get("WORLD_SIZE", "1")), m.data * m.tensor * m.pipe
    if size != world:
        hint = (f"launch with torchrun --nproc-per-node {size}" if world == 1 else
                f"set mesh.data x mesh.tensor x mesh.pipe to {world}, or launch {size} processes")
        raise UserError(f"mesh.data={m.data} x mesh.tensor={m.tensor} x mesh.pipe={m.pipe} = {size} ranks, but "
                        f"the world has {world} ({hint})")
    if world > 1:
        missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in env]
        if missing:
            raise UserError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: start the processes with torchrun")


def _check_gpus(config: Any, env: Mapping[str, str], cuda_available: bool, gpus: int) -> None:
    device = config.run.device
    wants_cuda = device.startswith("cuda") or (device == "auto" and cuda_available)
    if not wants_cuda:
        return
    if not cuda_available:
        raise UserError(f"run.device={device!r} but torch sees no CUDA device (a CPU build of torch, or no GPU)")
    local = int(env.get("LOCAL_WORLD_SIZE", "1"))
    if local > gpus:
        raise UserError(f"{local} processes on this node but it has {gpus} GPU(s): use torchrun "
                        f"--nproc-per-node {gpus} on each node (and more nodes), or a smaller mesh")


def check_launch(config: Any, env: Optional[Mapping[str, str]] = None) -> None:
    """Raise a UserError naming the first problem of this launch for ``config``."""
    import torch

    env = os.environ if env is None else env
    _check_versions(torch.__version__, tuple(sys.version_info[:3]))
    _check_world(config, env)
    available = torch.cuda.is_available()
    _check_gpus(config, env, available, torch.cuda.device_count() if available else 0)
