"""What the Trainer needs to run a config's ``mesh``/``zero`` sections: the partitioner, the sharded
steps and the spec trees its checkpoints are written and resharded with.

Config keys (public schema, docs/config.md): ``mesh.data``, ``mesh.tensor``, ``mesh.pipe`` (must be
1 for now), ``mesh.sequence_parallel``, ``zero.stage``, ``zero.transport``. Under ``torchrun`` the mesh is built from the
launcher's environment; a mesh of one rank keeps the single-process path (no partitioner).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch.distributed as dist

from fastllm import models, random
from fastllm.sharding import checkpoint as sharded_checkpoint
from fastllm.sharding.mesh import Mesh
from fastllm.sharding.partitioner import Partitioner
from fastllm.train.sharded_step import init_sharded_state, make_sharded_eval_step, make_sharded_train_step
from fastllm.train.state import TrainState

__all__ = ["partitioner_from_config", "build_steps", "init_state", "checkpoint_specs", "is_main_rank"]


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
    return Partitioner(mesh, zero_stage=config.zero.stage, sequence_parallel=m.sequence_parallel,
                       transport=config.zero.transport)


def build_steps(config, partitioner: Partitioner, optimizer, schedule):
    """(train_step, eval_step) on shards. ``optimizer`` must not clip: the step clips over all shards."""
    t = config.train
    train_step = make_sharded_train_step(
        config.model_config, partitioner, optimizer, grad_accum=t.grad_accum, precision=t.precision,
        max_grad_norm=t.grad_clip, learning_rate=schedule, remat=t.remat == "block",
        compile=t.compile,
    )
    return train_step, make_sharded_eval_step(config.model_config, partitioner, precision=t.precision)


def init_state(config, partitioner: Partitioner, optimizer) -> TrainState:
    return init_sharded_state(config.model_config, partitioner, optimizer, random.key(config.run.seed))


def checkpoint_specs(config, partitioner: Partitioner, state: TrainState) -> dict[str, Any]:
    """The spec trees of a train state's checkpoint trees (see :func:`fastllm.train.checkpointing.save`)."""
    declarations = models.param_specs(config.model_config)
    params = partitioner.param_specs(declarations)
    opt_state = sharded_checkpoint.state_specs(state.opt_state, partitioner.opt_state_specs(declarations))
    return {"params": params, "opt_state": opt_state}
