"""Atomic, self-describing checkpoint directories (see the package docstring for the layout)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import optree
import safetensors.torch
import torch
from torch import Tensor

from fastllm import tree
from fastllm.errors import UserError
from fastllm.tree import PyTree

__all__ = ["CheckpointError", "save", "load", "verify", "is_complete", "FORMAT"]

FORMAT = "fastllm.checkpoint/1"
MARKER = "COMPLETE"
METADATA = "metadata.json"
_TREE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_SCALARS = (bool, int, float, str)
_CHUNK = 8 << 20

PathLike = Union[str, os.PathLike]


class CheckpointError(UserError, RuntimeError):
    """A checkpoint directory that is incomplete, corrupt or does not match what was asked for.

    Also a RuntimeError, as it was before it became a :class:`UserError`."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w") as handle:
        json.dump(value, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def _split_leaves(name: str, values: PyTree) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Flat tensors (CPU, contiguous, not sharing storage) and flat Python scalars of one tree."""
    tensors, scalars, storages = {}, {}, set()
    for path, leaf in tree.flatten(values).items():
        if isinstance(leaf, Tensor):
            t = leaf.detach().to("cpu").contiguous()
            storage = t.untyped_storage()
            if storage.data_ptr() in storages or storage.nbytes() != t.nbytes:
                t = t.clone()  # safetensors refuses aliased tensors; also drops a view's spare bytes
            storages.add(t.untyped_storage().data_ptr())
            tensors[path] = t
        elif isinstance(leaf, _SCALARS):
            scalars[path] = leaf
        else:
            raise TypeError(f"checkpoint tree {name!r}: leaf {path!r} has unsupported type "
                            f"{type(leaf).__name__} (tensors, bool, int, float and str are stored)")
    return tensors, scalars


def _write_tree(directory: Path, name: str, values: PyTree) -> dict:
    if not _TREE_NAME.match(name):
        raise ValueError(f"checkpoint tree name {name!r} must match {_TREE_NAME.pattern}")
    tensors, scalars = _split_leaves(name, values)
    filename = f"{name}.safetensors"
    safetensors.torch.save_file(tensors, directory / filename)
    _fsync_file(directory / filename)
    return {"file": filename, "tensors": len(tensors), "scalars": scalars}


def _manifest(directory: Path, checksum: bool) -> dict:
    files = {}
    for file in sorted(directory.iterdir()):
        entry = {"bytes": file.stat().st_size}
        if checksum:
            entry["sha256"] = _sha256(file)
        files[file.name] = entry
    return {"format": FORMAT, "files": files}


def save(
    path: PathLike,
    trees: Mapping[str, PyTree],
    metadata: Optional[Mapping[str, Any]] = None,
    *,
    overwrite: bool = False,
    checksum: bool = True,
    _hook: Optional[Callable[[str], None]] = None,
) -> Path:
    """Write ``trees`` (name -> pytree) and JSON ``metadata`` atomically into directory ``path``."""
    path = Path(path)
    hook = _hook or (lambda stage: None)
    if path.exists() and not overwrite:
        raise FileExistsError(f"checkpoint {path} already exists (pass overwrite=True to replace)")
    try:
        metadata_json = json.loads(json.dumps(dict(metadata or {})))
    except (TypeError, ValueError) as error:
        raise TypeError(f"checkpoint {path}: metadata is not JSON-serialisable: {error}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an earlier crashed save with our pid
    tmp.mkdir()
    try:
        hook("tmp_created")
        described = {}
        for name, values in trees.items():
            described[name] = _write_tree(tmp, name, values)
            hook(f"wrote:{name}")
        _write_json(tmp / METADATA, {"format": FORMAT, "trees": described, "metadata": metadata_json})
        hook("before_complete")
        _write_json(tmp / MARKER, _manifest(tmp, checksum))  # last: its presence means complete
        _fsync_dir(tmp)
        hook("before_rename")
        _commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _commit(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path`` (atomic), moving an existing ``path`` aside first."""
    aside = None
    if path.exists():
        aside = path.with_name(f"{path.name}.old-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if aside is not None:
        shutil.rmtree(aside)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path.parent}: cannot read {what} {path.name}: {error}")


def verify(path: PathLike, checksum: bool = True) -> dict:
    """The manifest of a complete checkpoint; raises :class:`CheckpointError` naming the problem."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    if not (path / MARKER).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no {MARKER} marker (the writer "
                              "probably stopped before finishing)")
    manifest = _read_json(path / MARKER, "the completion manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: {MARKER} is not a {FORMAT} manifest")
    for name, entry in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: file {name} listed in {MARKER} is missing")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"checkpoint {path}: file {name} has {size} bytes, expected "
                                  f"{entry['bytes']} (truncated or overwritten)")
        if checksum and "sha256" in entry and _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path}: file {name} fails its sha256 checksum "
                                  "(corrupted)")
    return manifest


def is_complete(path: PathLike) -> bool:
    """Cheap completeness test (marker present, listed files present with their sizes)."""
    try:
        verify(path, checksum=False)
    except CheckpointError:
        return False
    return True


def _restore(name: str, flat: dict[str, Any], like: PyTree) -> PyTree:
    """The values of ``flat`` arranged in the exact structure (NamedTuples, tuples...) of ``like``."""
    leaves, spec = optree.tree_flatten(like)
    paths = [path for path, _ in tree.leaves_with_path(like)]
    missing = [p for p in paths if p not in flat]
    unexpected = sorted(set(flat) - set(paths))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint tree {name!r} does not match the template: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")
    for path, template in zip(paths, leaves):
        value = flat[path]
        if isinstance(template, Tensor) and (
            not isinstance(value, Tensor) or value.shape != template.shape
        ):
            found = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise CheckpointError(f"checkpoint tree {name!r}: {path!r} is {found}, the template "
                                  f"expects shape {tuple(template.shape)}")
    return optree.tree_unflatten(spec, [flat[p] for p in paths])


def load(
    path: PathLike,
    like: Optional[Mapping[str, PyTree]] = None,
    *,
    names: Optional[Iterable[str]] = None,
    device: Union[str, torch.device] = "cpu",
    checksum: bool = True,
) -> tuple[dict[str, PyTree], dict[str, Any]]:
    """``(trees, metadata)`` of a complete checkpoint (see the package docstring)."""
    path = Path(path)
    verify(path, checksum=checksum)
    stored = _read_json(path / METADATA, "metadata")
    described = stored["trees"]
    wanted = list(described) if names is None else list(names)
    like = dict(like or {})
    trees = {}
    for name in wanted:
        if name not in described:
            raise CheckpointError(f"checkpoint {path} has no tree {name!r} (it has {sorted(described)})")
        entry = described[name]
        try:
            flat = safetensors.torch.load_file(path / entry["file"], device=str(device))
        except Exception as error:  # noqa: BLE001 - the safetensors error types vary by version
            raise CheckpointError(f"checkpoint {path}: cannot read {entry['file']}: {error}") from None
        flat.update(entry["scalars"])
        trees[name] = _restore(name, flat, like[name]) if name in like else tree.unflatten(flat)
    return trees, stored["metadata"]
