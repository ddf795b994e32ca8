"""What the Trainer needs to run a config's ``mesh``/``zero`` sections: the partitioner, the sharded
steps, and checkpoints written by every rank (fastllm.sharding.checkpoint).

Config keys (public schema, docs/config.md): ``mesh.data``, ``mesh.tensor``, ``mesh.pipe`` (must be
1 for now), ``mesh.sequence_parallel``, ``zero.stage``. Under ``torchrun`` the mesh is built from the
launcher's environment; a mesh of one rank keeps the single-process path (no partitioner).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from fastllm import random
from fastllm.sharding.mesh import Mesh
from fastllm.sharding.partitioner import Partitioner
from fastllm.train.state import TrainState

# fastllm.sharding.step is imported inside the functions: it imports fastllm.train, whose package
# imports the Trainer, which imports this module.

__all__ = ["partitioner_from_config", "build_steps", "init_state", "save", "restore", "is_main_rank"]


def is_main_rank() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def partitioner_from_config(config, mesh: Optional[Mesh] = None) -> Optional[Partitioner]:
    """The partitioner of ``config.mesh``/``config.zero`` (``None``: one process, no mesh)."""
    m = config.mesh
    if m.pipe > 1:
        raise NotImplementedError(f"mesh.pipe={m.pipe}: pipeline parallelism is not supported yet; use mesh.pipe=1")
    world = int(os.environ.get("WORLD_SIZE", "1")) if mesh is None else mesh.world_size
    if m.size != world:
        raise ValueError(f"mesh.data={m.data} x mesh.tensor={m.tensor} x mesh.pipe={m.pipe} = {m.size} ranks, "
                         f"but the world has {world} (launch with torchrun --nproc-per-node {m.size})")
    if world == 1:
        return None
    mesh = mesh or Mesh.from_env(data=m.data, tensor=m.tensor, pipe=m.pipe)
    return Partitioner(mesh, zero_stage=config.zero.stage, sequence_parallel=m.sequence_parallel)


def build_steps(config, partitioner: Partitioner, optimizer, schedule):
    """(train_step, eval_step) on shards. ``optimizer`` must not clip: the step clips over all shards."""
    from fastllm.sharding.step import make_sharded_eval_step, make_sharded_train_step

    t = config.train
    if t.remat != "none":
        raise NotImplementedError(f"train.remat={t.remat!r} under a mesh is not supported yet; use train.remat=none")
    train_step = make_sharded_train_step(
        config.model_config, partitioner, optimizer, grad_accum=t.grad_accum, precision=t.precision,
        max_grad_norm=t.grad_clip, learning_rate=schedule,
    )
    return train_step, make_sharded_eval_step(config.model_config, partitioner, precision=t.precision)


def init_state(config, partitioner: Partitioner, optimizer) -> TrainState:
    from fastllm.sharding.step import init_sharded_state

    return init_sharded_state(config.model_config, partitioner, optimizer, random.key(config.run.seed))


def _specs(config, partitioner: Partitioner, state: TrainState) -> dict[str, Any]:
    return {"params": partitioner.param_specs(config.model_config),
            "opt_state": partitioner.state_specs(config.model_config, state.opt_state)}


def save(path: Path, config, partitioner: Partitioner, state: TrainState, extra: dict) -> Path:
    """Every rank writes its shards of ``state`` into the sharded checkpoint ``path`` (collective)."""
    from fastllm.sharding import checkpoint

    meta = {"step": state.step, "key": {"seed": state.key.seed, "path": list(state.key.path)}, **extra}
    trees = {"params": state.params, "opt_state": state.opt_state}
    return checkpoint.save(path, trees, _specs(config, partitioner, state), partitioner.mesh, meta, overwrite=True)


def restore(path: Path, config, partitioner: Partitioner, template: TrainState) -> tuple[TrainState, dict]:
    """(state, metadata) of a sharded checkpoint, resharded onto this partitioner's layout."""
    from fastllm.sharding import checkpoint

    like = {"params": template.params, "opt_state": template.opt_state}
    trees, meta = checkpoint.load(path, _specs(config, partitioner, template), partitioner.mesh, like=like)
    key = random.Key(int(meta["key"]["seed"]), tuple(meta["key"]["path"]))
    return TrainState(trees["params"], trees["opt_state"], int(meta["step"]), key, None), meta
