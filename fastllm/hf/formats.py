"""Every model format fastllm writes, recognised and loaded by one function.

    loaded = fastllm.hf.load_any("runs/quickstart")   # -> Loaded(config, params, format, ...)

``fastllm convert`` and ``fastllm generate`` both read through :func:`load_any`. The formats, in
the order they are tried (the first match decides, so the ``config.json`` a training run writes
is never mistaken for a Hugging Face one):

=========  ==================================================================================
run        a training run directory: ``checkpoints/step-*/`` (its newest complete checkpoint)
training   one checkpoint of a one-process run: ``COMPLETE`` + ``metadata.json``
sharded    one checkpoint of a run on a mesh (every rank its shards): ``COMPLETE`` + ``sharded.json``
fastllm    ``fastllm.json`` + ``model.safetensors`` (``fastllm convert --to fastllm``)
hf         a Hugging Face directory: ``config.json`` + safetensors
=========  ==================================================================================

Anything else is a :class:`~fastllm.errors.UserError` saying what the directory lacks. Weights
are read only from safetensors; configs only from JSON.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from fastllm import checkpoint, tree
from fastllm.errors import UserError, read_json, reading
from fastllm.models import serialize
from fastllm.models.config import ModelConfig

__all__ = ["FORMATS", "Loaded", "detect", "load_any"]

FORMATS = ("run", "training", "sharded", "fastllm", "hf")
_EXPECTED = ("a training run directory (checkpoints/step-*), a training checkpoint (step-*/COMPLETE), "
             "a fastllm model directory (fastllm.json) or a Hugging Face directory (config.json)")


@dataclass(frozen=True)
class Loaded:
    """A model read from disk, and what travels with it."""

    config: ModelConfig
    params: dict
    format: str  # one of FORMATS
    tokenizer: Optional[Path]  # the tokenizer.json saved with the model, when there is one
    aux_dir: Optional[Path]  # where tokenizer/generation files sit beside the weights (fastllm, hf)
    eos_token: Optional[str]  # the EOS a training run appended to its documents, when known


def _run_checkpoint(path: Path) -> Optional[Path]:
    from fastllm.train import checkpointing

    if not (path / "checkpoints").is_dir():
        return None
    newest = checkpointing.latest(path)
    if newest is None:
        raise UserError(f"{path}: a training run directory without a complete checkpoint in "
                        "checkpoints/ (the run stopped before its first save?)")
    return newest


def _checkpoint_kind(path: Path) -> Optional[str]:
    """"training" or "sharded" for a checkpoint directory (verified), ``None`` for anything else."""
    from fastllm.sharding.checkpoint import INDEX

    if (path / INDEX).is_file():
        kind = "sharded"
    elif (path / "metadata.json").is_file() or (path / checkpoint.store.MARKER).is_file():
        kind = "training"
    else:
        return None
    checkpoint.verify(path, checksum=False)  # names what is missing or truncated
    return kind


def detect(path: str | os.PathLike) -> str:
    """The format of ``path`` (one of :data:`FORMATS`); a UserError when it is none of them."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: does not exist; expected {_EXPECTED}")
    if not path.is_dir():
        raise UserError(f"{path}: is a file; expected a directory: {_EXPECTED}")
    if _run_checkpoint(path) is not None:
        return "run"
    kind = _checkpoint_kind(path)
    if kind is not None:
        return kind
    if serialize.is_model_dir(path):
        return "fastllm"
    if (path / "config.json").is_file():
        return "hf"
    raise UserError(f"{path}: not a model directory; expected {_EXPECTED}")


def _training_eos(saved: Optional[dict]) -> Optional[str]:
    """The EOS token the run's first dataset was prepared with, while its manifest is still there."""
    from fastllm.data.dataset import recorded_eos

    datasets = ((saved or {}).get("data") or {}).get("datasets") or []
    first = datasets[0] if datasets else None
    return recorded_eos(first["path"]) if isinstance(first, dict) and isinstance(first.get("path"), str) else None


def _tokenizer_in(*directories: Path) -> Optional[Path]:
    return next((d / "tokenizer.json" for d in directories if (d / "tokenizer.json").is_file()), None)


def _load_training(path: Path, kind: str, device) -> Loaded:
    from fastllm.train import checkpointing

    config, params, saved = checkpointing.load_model(path, device=device)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    tokenizer = _tokenizer_in(path, *([run_dir] if run_dir else []))
    return Loaded(config, params, kind, tokenizer, None, _training_eos(saved))


def _load(path: Path, kind: str, dtype: Optional[torch.dtype], device) -> Loaded:
    from fastllm import hf

    if kind == "run":
        loaded = _load_training(_run_checkpoint(path), kind, device)
        return replace(loaded, tokenizer=_tokenizer_in(path) or loaded.tokenizer)
    if kind in ("training", "sharded"):
        return _load_training(path, kind, device)
    if kind == "fastllm":
        read_json(path / serialize.CONFIG_FILE, "fastllm model header")  # load_model expects an object there
        config, params = serialize.load_model(path, device=device)
    else:
        config, params = hf.load(path, dtype=dtype, device=device)
    return Loaded(config, params, kind, _tokenizer_in(path), path, None)


def load_any(path: str | os.PathLike, *, dtype: Optional[torch.dtype] = None,
             device: torch.device | str = "cpu") -> Loaded:
    """Detect the format of ``path`` and load it; ``dtype=None`` keeps the stored dtype."""
    path = Path(path)
    kind = detect(path)
    with reading(path, f"the {kind} checkpoint"):
        loaded = _load(path, kind, dtype, device)
        serialize.check_params(loaded.config, tree.flatten(loaded.params), str(path))
    if dtype is not None:
        loaded = replace(loaded, params=tree.map(lambda t: t.to(dtype), loaded.params))
    return loaded
