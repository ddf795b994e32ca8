"""Sharded checkpoints: every rank writes its own shards; loading reshards onto any other mesh.

Layout of one checkpoint directory (``save(path, trees, specs, mesh, metadata)``)::

    step-00001000/
      shard-00000.safetensors  the blocks rank 0 writes, under flat dotted names
      shard-00003.safetensors  ("params.layers.3.attention.wq", "opt_state.1.0.mu.embed.tokens", ...)
      sharded.json             the index: per tensor its global shape, dtype, PartitionSpec and the
                               blocks (file, start, shape) that tile it; the mesh; user metadata
      COMPLETE                 manifest of every file (bytes, sha256), written last by rank 0

Each block of a tensor is written once: among the ranks holding the same block (the replicas
along the mesh axes its spec does not use) the one at coordinate 0 on those axes writes it, so a
file may be missing for ranks that hold only replicas. Blocks of one tensor never overlap, and
together they tile it exactly.

Atomicity reuses :mod:`fastllm.checkpoint.store`: the ranks write into ``<path>.tmp-<pid of rank
0>``, fsync their files and report sizes and sha256 to rank 0; after that barrier rank 0 writes the
index, then ``COMPLETE``, fsyncs the directory and renames it into place. An interrupted save
leaves only the ``.tmp-`` directory (no ``COMPLETE``), which ``load``, ``checkpoint.latest`` and
``checkpoint.is_complete`` reject; ``checkpoint.prune(..., remove_partial=True)`` removes it. All
ranks must see the same filesystem.

Resharding. ``load(path, specs, mesh)`` gives each rank its block under *its* spec and mesh: it
intersects that block with the stored blocks and reads only the intersections, lazily, with
safetensors' ``get_slice``. The saved and loading layouts are independent (data=2 x tensor=2 to
data=4, tensor=4 or one process). ``load_full(path)`` assembles whole tensors in one process, e.g.
for ``fastllm convert``.

Trees are any pytrees of tensors (params, gradients, optimizer state) with a tree of
:class:`PartitionSpec` of the same structure (``is_leaf=is_spec``); Python ``bool``/``int``/
``float``/``str`` leaves (their spec is ignored) are stored in the index.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import optree
import safetensors.torch
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor

from fastllm import tree
from fastllm.checkpoint import store
from fastllm.checkpoint.store import CheckpointError
from fastllm.sharding.mesh import AXES, Mesh
from fastllm.sharding.spec import PartitionSpec, is_spec, local_shape
from fastllm.tree import PyTree

__all__ = [
    "FORMAT",
    "INDEX",
    "save",
    "load",
    "load_full",
    "is_sharded",
    "read_index",
    "state_specs",
    "CheckpointError",
]

FORMAT = "fastllm.sharded-checkpoint/1"
INDEX = "sharded.json"
_SCALARS = (bool, int, float, str)

PathLike = Union[str, os.PathLike]


# --- layout -------------------------------------------------------------------------------------
def _spec_to_json(spec: PartitionSpec) -> list:
    return [list(entry) if isinstance(entry, tuple) else entry for entry in spec]


def _spec_from_json(entries: list) -> PartitionSpec:
    return PartitionSpec(*(tuple(entry) if isinstance(entry, list) else entry for entry in entries))


def _block(global_shape: list[int], spec: PartitionSpec, mesh: Mesh, name: str) -> tuple[list, list]:
    """(start, shape) of the block of a global tensor that ``mesh``'s rank holds under ``spec``."""
    shape = list(local_shape(tuple(global_shape), spec, mesh, name=name))
    start = [mesh.rank(spec.axes(dim)) * size if spec.axes(dim) else 0 for dim, size in enumerate(shape)]
    return start, shape


def _writer_ranks(spec: PartitionSpec, mesh_shape: dict[str, int]) -> list[int]:
    """The ranks that write a block: coordinate 0 along every axis the spec does not split over."""
    plan = Mesh.abstract(**mesh_shape)
    unused = [axis for axis in AXES if axis not in spec.used_axes]
    return [r for r in range(plan.world_size) if all(plan.coords_of(r)[a] == 0 for a in unused)]


def _shard_file(rank: int) -> str:
    return f"shard-{rank:05d}.safetensors"


def state_specs(state: PyTree, param_specs: PyTree) -> PyTree:
    """The spec tree of an optimizer state: ``param_specs`` for each params-shaped subtree (the
    moments), replicated specs for the other tensors (the step count) and for Python scalars."""
    params_def = optree.tree_structure(param_specs, is_leaf=is_spec)

    def walk(node: Any) -> Any:
        if isinstance(node, Tensor):
            return PartitionSpec(*[None] * node.ndim)
        if isinstance(node, _SCALARS) or node is None:
            return PartitionSpec()
        if optree.tree_structure(node) == params_def:
            return param_specs
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(walk(child) for child in node))
        if isinstance(node, (tuple, list)):
            return type(node)(walk(child) for child in node)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        raise TypeError(f"optimizer state node of type {type(node).__name__} is not a tensor, scalar or container")

    return walk(state)


# --- save ---------------------------------------------------------------------------------------
def _flat_specs(name: str, specs: PyTree, paths: Iterable[str]) -> dict[str, PartitionSpec]:
    """The spec of each leaf path of the tree ``name``; a mismatch names the paths.

    A 0-d spec where the tree has no leaf is dropped: resolving ``optim.state_axes`` gives an empty
    state (``EmptyState()``, a 0-field tuple) the spec ``PartitionSpec()``.
    """
    flat = tree.flatten(specs, is_leaf=is_spec)
    wrong = [path for path, spec in flat.items() if not is_spec(spec)]
    if wrong:
        raise TypeError(f"spec tree {name!r}: leaves {wrong[:5]} are not PartitionSpecs")
    paths = list(paths)
    flat = {p: s for p, s in flat.items() if p in set(paths) or len(s) != 0}
    _check_paths(f"tree {name!r} and its spec tree", ("the tree", paths), ("the spec tree", flat))
    return {path: flat[path] for path in paths}


def _check_paths(what: str, first: tuple[str, Iterable[str]], second: tuple[str, Iterable[str]]) -> None:
    """Raise, naming the paths, when two labelled sets of paths differ."""
    (a, a_paths), (b, b_paths) = first, second
    a_paths, b_paths = set(a_paths), set(b_paths)
    if a_paths != b_paths:
        raise CheckpointError(f"{what} do not match: only in {a}: {sorted(a_paths - b_paths)[:5] or 'none'}; "
                              f"only in {b}: {sorted(b_paths - a_paths)[:5] or 'none'}")


def _describe(name: str, values: PyTree, specs: PyTree, mesh: Mesh) -> tuple[dict, dict[str, Tensor]]:
    """The index entry of one tree (global shapes, dtypes, specs, blocks) and this rank's blocks."""
    if not store._TREE_NAME.match(name):
        raise ValueError(f"checkpoint tree name {name!r} must match {store._TREE_NAME.pattern}")
    flat = tree.flatten(values)
    flat_specs = _flat_specs(name, specs, flat)
    tensors, scalars, mine = {}, {}, {}
    for path, leaf in flat.items():
        if isinstance(leaf, _SCALARS):
            scalars[path] = leaf
            continue
        if not isinstance(leaf, Tensor):
            raise TypeError(f"tree {name!r}: leaf {path!r} has unsupported type {type(leaf).__name__}")
        spec, key = flat_specs[path], f"{name}.{path}"
        if leaf.ndim != len(spec):
            raise ValueError(f"{key}: spec {spec!r} has {len(spec)} entries but the local shard has "
                             f"shape {tuple(leaf.shape)}")
        global_shape = [n * mesh.size(spec.axes(d)) for d, n in enumerate(leaf.shape)]
        blocks = []
        for rank in _writer_ranks(spec, mesh.shape):
            start, shape = _block(global_shape, spec, Mesh.abstract(**mesh.shape, rank=rank), key)
            blocks.append({"file": _shard_file(rank), "start": start, "shape": shape})
            if rank == mesh.global_rank:
                mine[key] = leaf.detach().to("cpu", copy=True).contiguous()  # a copy: no shared storage
        tensors[path] = {"shape": global_shape, "dtype": str(leaf.dtype).removeprefix("torch."),
                         "spec": _spec_to_json(spec), "blocks": blocks}
    return {"tensors": tensors, "scalars": scalars}, mine


def _gather(mesh: Mesh, value: Any) -> list[Any]:
    """Every rank's ``value`` (a barrier too); one process: ``[value]``."""
    if mesh.world_size == 1:
        return [value]
    values: list[Any] = [None] * mesh.world_size
    dist.all_gather_object(values, value)
    return values


class _Failed:
    """What a rank that raised sends the others: its error as text (exceptions may not pickle)."""

    def __init__(self, error: BaseException):
        self.error, self.text = error, f"{type(error).__name__}: {error}"

    def __getstate__(self):
        return {"error": None, "text": self.text}


def _attempt(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - reported to every rank, re-raised there
        return _Failed(error)


def _all_ok(mesh: Mesh, outcome: Any, what: str, cleanup: Callable[[], None] = lambda: None) -> list[Any]:
    """Every rank's outcome; raise on every rank when any failed (so none waits for the others),
    after ``cleanup`` has run on every rank."""
    outcomes = _gather(mesh, outcome)
    failed = [(rank, out) for rank, out in enumerate(outcomes) if isinstance(out, _Failed)]
    if failed:
        cleanup()
        _gather(mesh, None)  # barrier: no rank returns before the cleanup is done everywhere
        rank, failure = failed[0]
        mine = outcome.error if isinstance(outcome, _Failed) else None
        raise CheckpointError(f"sharded save ({what}) failed on rank {rank}: {failure.text}") from mine
    return outcomes


def save(
    path: PathLike,
    trees: Mapping[str, PyTree],
    specs: Mapping[str, PyTree],
    mesh: Mesh,
    metadata: Optional[Mapping[str, Any]] = None,
    *,
    overwrite: bool = False,
    checksum: bool = True,
    _hook: Optional[Callable[[str], None]] = None,
) -> Path:
    """Write this rank's shards of ``trees`` (name -> local tree, laid out by ``specs[name]``).

    Collective: every rank of ``mesh`` calls it with the same names, paths and specs. Returns after
    rank 0 has committed the directory (so any rank may load it right away).
    """
    path, hook = Path(path), _hook or (lambda stage: None)
    described = _attempt(lambda: _describe_all(trees, specs, mesh))
    index = _all_ok(mesh, described if isinstance(described, _Failed) else described[0], "describe")
    if any(entry != index[0] for entry in index):
        rank = next(r for r, entry in enumerate(index) if entry != index[0])
        raise CheckpointError(f"sharded save: rank {rank} holds other paths, shapes, dtypes or specs "
                              "than rank 0")
    is_first = mesh.global_rank == 0
    tmp = _all_ok(mesh, _attempt(lambda: _make_tmp(path, overwrite)) if is_first else None, "create")[0]

    def write() -> dict:  # hooks run inside the attempt, so a failing one aborts every rank
        hook("tmp_created")
        written = _write_shards(tmp, mesh.global_rank, described[1], checksum)
        hook("shards_written")
        return written

    files = _all_ok(mesh, _attempt(write), "write shards",
                    cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True) if is_first else None)
    outcome = None
    if is_first:
        outcome = _attempt(lambda: _commit(tmp, path, index[0], files, mesh, metadata, checksum, hook))
    _all_ok(mesh, outcome, "commit")
    return path


def _describe_all(trees: Mapping[str, PyTree], specs: Mapping[str, PyTree], mesh: Mesh) -> tuple[dict, dict]:
    """(index entries of every tree, as JSON would return them; this rank's blocks to write)."""
    if set(trees) != set(specs):
        raise CheckpointError(f"trees {sorted(trees)} and specs {sorted(specs)} name different trees")
    entries, mine = {}, {}
    for name in trees:
        entries[name], blocks = _describe(name, trees[name], specs[name], mesh)
        mine.update(blocks)
    return json.loads(json.dumps(entries)), mine


def _make_tmp(path: Path, overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise FileExistsError(f"checkpoint {path} already exists (pass overwrite=True to replace)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an earlier crashed save with our pid
    tmp.mkdir()
    return tmp


def _write_shards(tmp: Path, rank: int, blocks: dict[str, Tensor], checksum: bool) -> dict:
    """Write this rank's blocks (no file when it holds none); ``{file: {"bytes", "sha256"}}``."""
    if not blocks:
        return {}
    file = tmp / _shard_file(rank)
    safetensors.torch.save_file(blocks, file)
    store._fsync_file(file)
    entry = {"bytes": file.stat().st_size}
    if checksum:
        entry["sha256"] = store._sha256(file)
    return {file.name: entry}


def _commit(tmp, path, entries, files, mesh, metadata, checksum, hook) -> None:
    try:
        index = {"format": FORMAT, "mesh": dict(mesh.shape), "trees": entries,
                 "metadata": json.loads(json.dumps(dict(metadata or {})))}
        store._write_json(tmp / INDEX, index)
        manifest = {"format": store.FORMAT, "files": {}}
        for per_rank in files:
            manifest["files"].update(per_rank)
        manifest["files"][INDEX] = {"bytes": (tmp / INDEX).stat().st_size}
        if checksum:
            manifest["files"][INDEX]["sha256"] = store._sha256(tmp / INDEX)
        hook("before_complete")
        store._write_json(tmp / store.MARKER, manifest)  # last: its presence means complete
        store._fsync_dir(tmp)
        hook("before_rename")
        store._commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- load ---------------------------------------------------------------------------------------
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
    flat_specs = _flat_specs(name, specs, paths)
    _check_paths(f"checkpoint {reader.path}: tree {name!r} stored and asked for",
                 ("the checkpoint", [*stored["tensors"], *stored["scalars"]]), ("the tree asked for", paths))
    values = []
    for path, spec in flat_specs.items():
        if path in stored["scalars"]:
            values.append(stored["scalars"][path])
            continue
        entry, key = stored["tensors"][path], f"{name}.{path}"
        start, shape = _block(entry["shape"], spec, mesh, key)
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
            if name not in index["trees"]:
                raise CheckpointError(f"checkpoint {path} has no tree {name!r} (it has {sorted(index['trees'])})")
            template = None if like is None else like.get(name)
            loaded = _load_tree(reader, name, index["trees"][name], tree_specs, mesh, template)
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
            if name not in index["trees"]:
                raise CheckpointError(f"checkpoint {path} has no tree {name!r} (it has {sorted(index['trees'])})")
            stored = index["trees"][name]
            flat = dict(stored["scalars"])
            for p, entry in stored["tensors"].items():
                whole = PartitionSpec(*[None] * len(entry["shape"]))
                start, shape = _block(entry["shape"], whole, single, f"{name}.{p}")
                flat[p] = _read_block(reader, f"{name}.{p}", entry, start, shape).to(device)
            trees[name] = tree.unflatten(flat)
    finally:
        reader.close()
    return index["metadata"], trees
