"""Training checkpoints: a :class:`TrainState` plus JSON extras, through :mod:`fastllm.checkpoint`.

``<run_dir>/checkpoints/step-00000100/`` holds the trees ``params``, ``opt_state`` and (fp16)
``loss_scale`` as safetensors, and the metadata (step, random key, data position, config) as JSON.
:mod:`fastllm.checkpoint` writes it atomically (a crash mid-write leaves no ``step-*`` directory,
only a ``.tmp-<pid>`` leftover that :func:`latest` ignores and the next :func:`prune` removes) and
refuses an incomplete or corrupted one with a message naming the file. Loading fills a freshly
initialised *template* state, so a checkpoint of another model shape is refused naming the tensor.

Under a mesh (``specs`` and ``mesh`` given) every rank writes its shards through
:mod:`fastllm.sharding.checkpoint` into the same ``step-XXXXXXXX`` directory, with the same
``COMPLETE`` manifest, so :func:`latest` and :func:`prune` serve both kinds, and loading reshards
onto the loading mesh.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from fastllm import checkpoint, random
from fastllm.checkpoint import CheckpointError
from fastllm.sharding import checkpoint as sharded
from fastllm.sharding.mesh import Mesh
from fastllm.train.state import TrainState

__all__ = [
    "CheckpointError", "checkpoint_dir", "save", "load", "load_model", "latest", "prune", "is_training_checkpoint",
]


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _trees(state: TrainState) -> dict[str, Any]:
    trees = {"params": state.params, "opt_state": state.opt_state}
    if state.loss_scale is not None:
        trees["loss_scale"] = state.loss_scale
    return trees


def save(
    run_dir: str | os.PathLike, state: TrainState, extra: dict[str, Any], *, specs=None, mesh=None, group=None
) -> Path:
    """Write ``state`` and the JSON-ready ``extra`` as ``checkpoints/step-<step>``; returns its path.

    Under a mesh pass ``specs`` (name -> spec tree of ``state``'s trees) and ``mesh``: a collective
    that every rank calls (over ``group``, default the world's); it returns once the checkpoint is
    complete."""
    meta = {"step": state.step, "key": {"seed": state.key.seed, "path": list(state.key.path)}, **extra}
    path = checkpoint.step_dir(checkpoint_dir(run_dir), state.step)
    if mesh is not None:
        return sharded.save(path, _trees(state), specs, mesh, meta, overwrite=True, group=group)
    return checkpoint.save(path, _trees(state), meta, overwrite=True)


def load(
    path: str | os.PathLike, template: TrainState, *, device="cpu", specs=None, mesh=None, checksum: bool = True
) -> tuple[TrainState, dict[str, Any]]:
    """(state, extra) of the checkpoint at ``path``, laid out like ``template`` (under a mesh: this
    rank's shards by ``specs``, whatever mesh wrote them; without one: whole tensors). ``checksum``:
    check the sha256 of what is read (``False`` when it was verified already)."""
    like = _trees(template)
    if mesh is None and sharded.is_sharded(path):  # any sharded checkpoint, assembled in this process
        mesh, specs = Mesh.local(device), {name: _whole(tree) for name, tree in like.items()}
    if mesh is not None and (sharded.is_sharded(path) or mesh.world_size > 1):
        trees, meta = sharded.load(path, specs, mesh, like=like, device=device, checksum=checksum)
    else:  # a one-process checkpoint of fastllm.checkpoint.save
        trees, meta = checkpoint.load(path, like=like, device=device, checksum=checksum)
    key = random.Key(int(meta["key"]["seed"]), tuple(meta["key"]["path"]))
    extra = {name: value for name, value in meta.items() if name not in ("step", "key")}
    state = TrainState(trees["params"], trees["opt_state"], int(meta["step"]), key, trees.get("loss_scale"))
    return state, extra


def _whole(values: Any) -> Any:
    """Specs that keep every tensor whole (replicated), for loading into one process."""
    return sharded.state_specs(values, None)


def latest(run_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint of a run (``None`` when there is none)."""
    return checkpoint.latest(checkpoint_dir(run_dir))


def prune(run_dir: str | os.PathLike, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints; also clear leftovers of crashed saves (one writer)."""
    checkpoint.prune(checkpoint_dir(run_dir), keep, remove_partial=True)


def load_model(path: str | os.PathLike, *, device="cpu") -> tuple[Any, dict, Optional[dict[str, Any]]]:
    """(ModelConfig, params, saved config dict or None) of a training checkpoint, without optimizer state.

    ``path`` is a checkpoint directory or a run directory (its newest checkpoint is used); a sharded
    checkpoint is assembled into whole tensors in this process.
    """
    from fastllm.config import from_dict
    from fastllm.train.config import Config

    path = Path(path)
    newest = latest(path)
    if newest is not None:
        path = newest
    if sharded.is_sharded(path):
        meta, trees = sharded.load_full(path, names=["params"], device=device)
    else:
        trees, meta = checkpoint.load(path, names=["params"], device=device)
    if "config" in meta:
        return from_dict(Config, meta["config"]).model_config, trees["params"], meta["config"]
    if "model_config" in meta:  # a sharded save of a bare model (no training config)
        from fastllm.models import serialize

        return serialize.config_from_dict(meta["model_config"]), trees["params"], None
    raise CheckpointError(f"checkpoint {path} holds no model config ('config' or 'model_config' in its "
                          f"metadata); is it a training checkpoint?")


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """True for a run directory with a checkpoint, or a complete checkpoint directory."""
    return latest(path) is not None or checkpoint.is_complete(path)
