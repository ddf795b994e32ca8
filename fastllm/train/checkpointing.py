"""Training checkpoints: a :class:`TrainState` plus JSON extras in one atomic directory.

``<run_dir>/checkpoints/step_00000100/`` holds ``tensors.safetensors`` (params as ``params.<path>``,
optimizer state as ``opt_state.<path>``, loss scale as ``loss_scale.<i>``; all on CPU, dtypes kept)
and ``state.json`` (step, random key, data position, config). Optimizer-state paths are positions in
the state tree that ``optimizer.init`` builds, so loading fills a freshly initialised *template*
state leaf by leaf and refuses a checkpoint whose leaves or shapes differ, naming the first one.

Atomicity: everything is written into a hidden temporary directory, flushed to disk, then renamed
to its final name in one ``os.rename``; a crash mid-write leaves only the temporary directory,
which :func:`latest` never returns and the next save removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from fastllm import random, tree
from fastllm.train.state import TrainState

__all__ = ["CheckpointError", "save", "load", "load_model", "latest", "prune", "checkpoint_dir", "read_state_json"]

_NAME = re.compile(r"^step_(\d{8})$")
TENSORS, STATE = "tensors.safetensors", "state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupt or does not fit the run."""


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _flat_state(state: TrainState) -> dict[str, torch.Tensor]:
    flat = {}
    for section in ("params", "opt_state", "loss_scale"):
        value = getattr(state, section)
        if value is None:
            continue
        for path, leaf in tree.leaves_with_path(value):
            if isinstance(leaf, torch.Tensor):
                flat[f"{section}.{path}"] = leaf.detach().to("cpu").contiguous()
    return flat


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: str | os.PathLike, state: TrainState, extra: dict[str, Any]) -> Path:
    """Write ``state`` and the JSON-ready ``extra`` as ``checkpoints/step_<step>``; returns its path."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{state.step:08d}"
    temporary = root / f".tmp-{final.name}-{os.getpid()}"
    temporary.mkdir()
    save_file(_flat_state(state), str(temporary / TENSORS))
    meta = {"step": state.step, "key": {"seed": state.key.seed, "path": list(state.key.path)}, **extra}
    (temporary / STATE).write_text(json.dumps(meta, indent=1) + "\n")
    for file in (temporary / TENSORS, temporary / STATE, temporary):
        _fsync(file)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(temporary, final)
    _fsync(root)
    return final


def read_state_json(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / STATE
    if not file.is_file() or not (Path(path) / TENSORS).is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (needs {TENSORS} and {STATE})")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file}: corrupt checkpoint metadata ({error.msg})") from None


def _fill(section: str, template: Any, tensors: dict[str, torch.Tensor], device) -> Any:
    def take(path: str, leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf  # Python constants (e.g. loss-scale growth interval) come from the config
        name = f"{section}.{path}"
        if name not in tensors:
            raise CheckpointError(f"checkpoint has no tensor {name!r}; was it written by another config?")
        value = tensors.pop(name)
        if value.shape != leaf.shape:
            raise CheckpointError(f"{name}: checkpoint shape {tuple(value.shape)} != expected {tuple(leaf.shape)}")
        return value.to(device=device, dtype=leaf.dtype)

    return None if template is None else tree.map_with_path(take, template)


def load(path: str | os.PathLike, template: TrainState, *, device="cpu") -> tuple[TrainState, dict[str, Any]]:
    """(state, extra) of the checkpoint at ``path``, laid out like ``template``."""
    meta = read_state_json(path)
    try:
        tensors = load_file(str(Path(path) / TENSORS))
    except Exception as error:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"{path}: unreadable {TENSORS} ({error})") from None
    params = _fill("params", template.params, tensors, device)
    opt_state = _fill("opt_state", template.opt_state, tensors, device)
    loss_scale = _fill("loss_scale", template.loss_scale, tensors, device)
    if tensors:
        raise CheckpointError(f"{path}: unexpected tensor {sorted(tensors)[0]!r} for this config")
    key = random.Key(int(meta["key"]["seed"]), tuple(meta["key"]["path"]))
    extra = {name: value for name, value in meta.items() if name not in ("step", "key")}
    return TrainState(params, opt_state, int(meta["step"]), key, loss_scale), extra


def _complete(root: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in root.iterdir() if root.is_dir() else ():
        match = _NAME.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest(run_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint of a run (``None`` when there is none)."""
    found = _complete(checkpoint_dir(run_dir))
    return found[-1][1] if found else None


def prune(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints."""
    for _, path in _complete(checkpoint_dir(run_dir))[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_model(path: str | os.PathLike, *, device="cpu") -> tuple[Any, dict, dict[str, Any]]:
    """(ModelConfig, params, saved config dict) of a training checkpoint, without its optimizer state.

    ``path`` is a checkpoint directory or a run directory (its newest checkpoint is used).
    """
    from fastllm.config import from_dict
    from fastllm.train.config import Config

    path = Path(path)
    if not (path / STATE).is_file() and latest(path) is not None:
        path = latest(path)
    meta = read_state_json(path)
    config = from_dict(Config, meta["config"])
    flat = {name[len("params."):]: t.to(device) for name, t in load_file(str(path / TENSORS)).items()
            if name.startswith("params.")}
    return config.model_config, tree.unflatten(flat), meta["config"]
