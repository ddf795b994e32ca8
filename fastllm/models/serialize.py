"""fastllm's own model checkpoint: a directory with ``fastllm.json`` and ``model.safetensors``.

    fastllm.json       {"format": "fastllm-model", "version": 1, "config": <ModelConfig as a dict>}
    model.safetensors  every leaf under its dotted path (``layers.3.attention.wq``), our layouts

A directory is written beside its destination and renamed into place, so an interrupted save never
leaves something that looks like a complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from fastllm import config as config_lib
from fastllm import tree
from fastllm.models.config import ModelConfig

__all__ = [
    "FORMAT",
    "VERSION",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "config_to_dict",
    "config_from_dict",
    "check_params",
    "save_model",
    "load_model",
    "is_model_dir",
]

FORMAT = "fastllm-model"
VERSION = 1
CONFIG_FILE = "fastllm.json"
WEIGHTS_FILE = "model.safetensors"


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """A JSON-ready dict of every field (nested rope/moe as dicts)."""
    return config_lib.to_dict(config)


def _type_ok(value: Any, tp: Any) -> bool:
    if typing.get_origin(tp) is Literal:
        return value in typing.get_args(tp)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True  # containers and dataclasses are checked by the caller


def _check_types(cls: type, data: dict, prefix: str) -> None:
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if name not in hints:
            continue  # from_dict names unknown keys
        tp, nullable = config_lib._strip_optional(hints[name])
        if value is None:
            continue  # from_dict decides whether null is allowed
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            _check_types(tp, value, f"{prefix}{name}.")
        elif not _type_ok(value, tp):
            raise config_lib.ConfigError(f"{prefix}{name}: expected {getattr(tp, '__name__', tp)}, "
                                         f"got {value!r} ({type(value).__name__})")


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of :func:`config_to_dict`; an unknown or mistyped field is an error naming it."""
    if not isinstance(data, dict):
        raise config_lib.ConfigError(f"config: expected a mapping, got {type(data).__name__}")
    _check_types(ModelConfig, data, "")
    return config_lib.from_dict(ModelConfig, data)


def check_params(config: ModelConfig, flat: dict[str, torch.Tensor], source: str) -> None:
    """Names and shapes of flat params against the model's declaration; an error lists every mismatch."""
    from fastllm.models.decoder import param_specs  # decoder imports nn, which is heavier than this module

    expected = {path: spec.shape for path, spec in tree.leaves_with_path(param_specs(config), is_leaf=_is_param)}
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    wrong = [f"{p}: {tuple(flat[p].shape)} != {expected[p]}" for p in expected
             if p in flat and tuple(flat[p].shape) != expected[p]]
    if missing or unexpected or wrong:
        raise ValueError(f"{source}: parameters do not match the config: missing {missing or 'nothing'}; "
                         f"unexpected {unexpected or 'nothing'}; wrong shapes {wrong or 'none'}")


def _is_param(node) -> bool:
    from fastllm.nn.param import is_param

    return is_param(node)


def is_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def save_model(config: ModelConfig, params, path: str | os.PathLike) -> None:
    """Write ``path`` atomically: build a sibling temp directory, then rename it into place."""
    path = Path(path)
    flat = {name: t.detach().to("cpu").contiguous() for name, t in tree.flatten(params).items()}
    check_params(config, flat, str(path))
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or is_model_dir(path))):
        raise FileExistsError(f"{path} exists and is not a fastllm model directory; refusing to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        save_file(flat, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        header = {"format": FORMAT, "version": VERSION, "config": config_to_dict(config)}
        with open(staging / CONFIG_FILE, "w") as f:
            json.dump(header, f, indent=2)
        _swap_into_place(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_into_place(staging: Path, path: Path) -> None:
    if not path.exists():
        os.rename(staging, path)
        return
    retired = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.rename(path, retired)
    os.rename(staging, path)
    shutil.rmtree(retired)


def load_model(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu") -> tuple[ModelConfig, dict]:
    """(config, params) from a directory written by :func:`save_model`; ``dtype=None`` keeps the stored one."""
    path = Path(path)
    if not is_model_dir(path):
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; not a fastllm model directory")
    with open(path / CONFIG_FILE) as f:
        header = json.load(f)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_FILE}: 'format' must be {FORMAT!r}, got {header.get('format')!r}")
    if header.get("version") != VERSION:
        raise ValueError(f"{path / CONFIG_FILE}: unsupported version {header.get('version')!r} (reads {VERSION})")
    config = config_from_dict(header.get("config"))
    flat = load_file(path / WEIGHTS_FILE, device=str(device))
    check_params(config, flat, str(path / WEIGHTS_FILE))
    if dtype is not None:
        flat = {name: t.to(dtype) for name, t in flat.items()}
    return config, tree.unflatten(flat)
