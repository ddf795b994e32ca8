"""Reading a sharded checkpoint: each rank its block under its own spec and mesh (resharding), or
whole tensors in one process; only the regions asked for are read, lazily."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import optree
import torch
from safetensors import safe_open
from torch import Tensor

from fastllm import tree
from fastllm.checkpoint import store
from fastllm.checkpoint.store import CheckpointError
from fastllm.sharding.checkpoint.layout import FORMAT, INDEX, PathLike, check_paths, flat_specs, rank_block
from fastllm.sharding.mesh import Mesh
from fastllm.sharding.spec import PartitionSpec, is_spec
from fastllm.tree import PyTree

__all__ = ["is_sharded", "read_index", "load", "load_full"]


def is_sharded(path: PathLike) -> bool:
    """True for a directory written by :func:`save` (complete or not)."""
    return (Path(path) / INDEX).is_file()


def read_index(path: PathLike, *, checksum: bool = False) -> dict:
    """The index of a complete sharded checkpoint (``CheckpointError`` when incomplete or foreign)."""
    path = Path(path)
    store.verify(path, checksum=checksum)
    index = store._read_json(path / INDEX, "the sharded-checkpoint index")
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: {INDEX} is not a {FORMAT} index")
    return index


def _stored(index: dict, path: Path, name: str) -> dict:
    """The index entry of tree ``name``."""
    if name not in index["trees"]:
        raise CheckpointError(f"checkpoint {path} has no tree {name!r} (it has {sorted(index['trees'])})")
    return index["trees"][name]


class _Reader:
    """Opens each shard file once, on first use, checking its sha256 against the manifest first."""

    def __init__(self, path: Path, checksum: bool):
        self.path, self.checksum, self.handles = path, checksum, {}
        self.manifest = store._read_json(path / store.MARKER, "the completion manifest")

    def slice(self, file: str, key: str, region: tuple[slice, ...]) -> Tensor:
        if file not in self.handles:
            expected = self.manifest["files"].get(file, {}).get("sha256")
            if self.checksum and expected and store._sha256(self.path / file) != expected:
                raise CheckpointError(f"checkpoint {self.path}: file {file} fails its sha256 checksum "
                                      "(corrupted)")
            self.handles[file] = safe_open(self.path / file, framework="pt")
        handle = self.handles[file]
        return handle.get_tensor(key) if not region else handle.get_slice(key)[region]

    def close(self) -> None:
        for handle in self.handles.values():
            handle.__exit__(None, None, None)
        self.handles.clear()


def _read_block(reader: _Reader, key: str, entry: dict, start: list, shape: list) -> Tensor:
    """The region ``[start, start + shape)`` of a stored tensor, read from the blocks that hold it."""
    out = torch.empty(shape, dtype=getattr(torch, entry["dtype"]))
    covered = 0
    for block in entry["blocks"]:
        lo = [max(a, s) for a, s in zip(start, block["start"])]
        hi = [min(a + n, s + m) for a, n, s, m in zip(start, shape, block["start"], block["shape"])]
        if any(l >= h for l, h in zip(lo, hi)):
            continue
        source = tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, block["start"]))
        target = tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, start))
        out[target] = reader.slice(block["file"], key, source)
        covered += math.prod(h - l for l, h in zip(lo, hi))
    if covered != math.prod(shape):
        raise CheckpointError(f"checkpoint {reader.path}: the stored blocks of {key!r} cover {covered} of "
                              f"the {math.prod(shape)} elements asked for")
    return out


def _load_tree(reader: _Reader, name: str, stored: dict, specs: PyTree, mesh: Mesh, like: PyTree) -> PyTree:
    """This rank's blocks of tree ``name``, in the structure of ``like`` (else of ``specs``)."""
    if like is None:
        treedef = optree.tree_structure(specs, is_leaf=is_spec)
        paths = list(tree.flatten(specs, is_leaf=is_spec))
    else:
        treedef, paths = optree.tree_structure(like), [p for p, _ in tree.leaves_with_path(like)]
    leaf_specs = flat_specs(name, specs, paths)
    # A ``None`` spec marks a leaf this rank does not hold (another pipeline stage's): stored, not read.
    unheld = [p for p, s in tree.flatten(specs, is_leaf=lambda x: x is None or is_spec(x)).items() if s is None]
    check_paths(f"checkpoint {reader.path}: tree {name!r} stored and asked for",
                 ("the checkpoint", [*stored["tensors"], *stored["scalars"]]), ("the tree asked for", [*paths, *unheld]))
    values = []
    for path, spec in leaf_specs.items():
        if path in stored["scalars"]:
            values.append(stored["scalars"][path])
            continue
        entry, key = stored["tensors"][path], f"{name}.{path}"
        start, shape = rank_block(entry["shape"], spec, mesh, key)
        values.append(_read_block(reader, key, entry, start, shape))
    loaded = optree.tree_unflatten(treedef, values)
    if like is not None:
        _check_like(name, loaded, like)
    return loaded


def _check_like(name: str, loaded: PyTree, like: PyTree) -> None:
    for (path, value), template in zip(tree.leaves_with_path(loaded), tree.leaves(like)):
        if isinstance(template, Tensor) and (not isinstance(value, Tensor) or value.shape != template.shape):
            found = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise CheckpointError(f"tree {name!r}: {path!r} loads as {found} on this rank, the template "
                                  f"expects shape {tuple(template.shape)}")


def load(
    path: PathLike,
    specs: Mapping[str, PyTree],
    mesh: Mesh,
    *,
    like: Optional[Mapping[str, PyTree]] = None,
    device: Union[str, torch.device, None] = None,
    checksum: bool = True,
) -> tuple[dict[str, PyTree], dict[str, Any]]:
    """``(trees, metadata)``: for each name of ``specs``, this rank's blocks under ``specs[name]``.

    The trees take the structure of ``like[name]`` when given (name -> tree of local tensors, e.g.
    a fresh sharded init or ``opt.init`` of it, on any device; paths and local shapes are checked),
    else of the spec tree (pass ``like`` for an optimizer state holding ``EmptyState``). Tensors keep their stored dtype and go to ``device`` (default ``mesh.device``).
    ``checksum`` checks the sha256 of each file this rank reads. Needs no collectives.
    """
    path = Path(path)
    index = read_index(path)
    reader = _Reader(path, checksum)
    device = mesh.device if device is None else device
    trees = {}
    try:
        for name, tree_specs in specs.items():
            template = None if like is None else like.get(name)
            loaded = _load_tree(reader, name, _stored(index, path, name), tree_specs, mesh, template)
            trees[name] = tree.map(lambda t: t.to(device) if isinstance(t, Tensor) else t, loaded)
    finally:
        reader.close()
    return trees, index["metadata"]


def load_full(
    path: PathLike,
    *,
    names: Optional[Iterable[str]] = None,
    device: Union[str, torch.device] = "cpu",
    checksum: bool = True,
) -> tuple[dict[str, Any], dict[str, PyTree]]:
    """``(metadata, trees)`` of whole (unsharded) tensors, in one process and without a mesh.

    The trees are nested dicts, with lists where a level is keyed ``0..n-1`` (a params tree comes
    back exactly; pass it to ``load`` with a spec tree for NamedTuple structure).
    """
    path = Path(path)
    index = read_index(path)
    reader = _Reader(path, checksum)
    single = Mesh.abstract()
    wanted = list(index["trees"]) if names is None else list(names)
    trees = {}
    try:
        for name in wanted:
            stored = _stored(index, path, name)
            flat = dict(stored["scalars"])
            for p, entry in stored["tensors"].items():
                whole = PartitionSpec(*[None] * len(entry["shape"]))
                start, shape = rank_block(entry["shape"], whole, single, f"{name}.{p}")
                flat[p] = _read_block(reader, f"{name}.{p}", entry, start, shape).to(device)
            trees[name] = tree.unflatten(flat)
    finally:
        reader.close()
    return index["metadata"], trees
