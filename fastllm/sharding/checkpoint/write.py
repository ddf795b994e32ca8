"""Writing a sharded checkpoint: collective, every rank its own blocks, rank 0 commits atomically."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

import safetensors.torch
import torch.distributed as dist
from torch import Tensor

from fastllm import tree
from fastllm.checkpoint import store
from fastllm.checkpoint.store import CheckpointError
from fastllm.sharding.checkpoint.layout import (FORMAT, INDEX, SCALARS, PathLike, flat_specs, rank_block, shard_file,
                                                spec_from_json, spec_to_json, writer_ranks)
from fastllm.sharding.mesh import Mesh
from fastllm.tree import PyTree

__all__ = ["save"]


def _layout(name: str, values: PyTree, specs: PyTree, mesh: Mesh) -> tuple[dict, dict[str, Tensor]]:
    """What this rank holds of one tree (global shapes, dtypes, specs; scalars) and its tensors."""
    if not store._TREE_NAME.match(name):
        raise ValueError(f"checkpoint tree name {name!r} must match {store._TREE_NAME.pattern}")
    flat = tree.flatten(values)
    leaf_specs = flat_specs(name, specs, flat)
    tensors, scalars, held = {}, {}, {}
    for path, leaf in flat.items():
        if isinstance(leaf, SCALARS):
            scalars[path] = leaf
            continue
        if not isinstance(leaf, Tensor):
            raise TypeError(f"tree {name!r}: leaf {path!r} has unsupported type {type(leaf).__name__}")
        spec = leaf_specs[path]
        if leaf.ndim != len(spec):
            raise ValueError(f"{name}.{path}: spec {spec!r} has {len(spec)} entries but the local shard has "
                             f"shape {tuple(leaf.shape)}")
        tensors[path] = {"shape": [n * mesh.size(spec.axes(d)) for d, n in enumerate(leaf.shape)],
                         "dtype": str(leaf.dtype).removeprefix("torch."), "spec": spec_to_json(spec)}
        held[path] = leaf
    return {"tensors": tensors, "scalars": scalars}, held


def _merge(name: str, layouts: list[dict], held: dict[str, Tensor], mesh: Mesh) -> tuple[dict, dict[str, Tensor]]:
    """One tree's index entry from every rank's layout, and the blocks this rank writes. Ranks may
    hold different leaves (pipeline stages hold their own parts'): each leaf's blocks are written by
    the ranks that hold it, at the lowest pipeline coordinate among them."""
    tensors, scalars, mine = {}, {}, {}
    for rank, layout in enumerate(layouts):
        scalars.update({k: v for k, v in layout[name]["scalars"].items() if k not in scalars})
        for path, entry in layout[name]["tensors"].items():
            if path in tensors:
                if {k: tensors[path][k] for k in entry} != entry:
                    raise CheckpointError(f"sharded save: rank {rank} holds {name}.{path} with another shape, "
                                          f"dtype or spec than an earlier rank")
                continue
            holders = [r for r, other in enumerate(layouts) if path in other[name]["tensors"]]
            pipe = min(Mesh.abstract(**mesh.shape).coords_of(r)["pipe"] for r in holders)
            spec, key, blocks = spec_from_json(entry["spec"]), f"{name}.{path}", []
            for writer in writer_ranks(spec, mesh.shape, at={"pipe": pipe}):
                start, shape = rank_block(entry["shape"], spec, Mesh.abstract(**mesh.shape, rank=writer), key)
                blocks.append({"file": shard_file(writer), "start": start, "shape": shape})
                if writer == mesh.global_rank:
                    mine[key] = held[path].detach().to("cpu", copy=True).contiguous()  # no shared storage
            tensors[path] = {**entry, "blocks": blocks}
    return {"tensors": tensors, "scalars": scalars}, mine


def _gather(mesh: Mesh, value: Any, group: Optional[dist.ProcessGroup] = None) -> list[Any]:
    """Every rank's ``value`` (a barrier too); one process: ``[value]``."""
    if mesh.world_size == 1:
        return [value]
    values: list[Any] = [None] * mesh.world_size
    dist.all_gather_object(values, value, group=group)
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


def _all_ok(mesh: Mesh, outcome: Any, what: str, cleanup: Callable[[], None] = lambda: None,
            group: Optional[dist.ProcessGroup] = None) -> list[Any]:
    """Every rank's outcome; raise on every rank when any failed (so none waits for the others),
    after ``cleanup`` has run on every rank."""
    outcomes = _gather(mesh, outcome, group)
    failed = [(rank, out) for rank, out in enumerate(outcomes) if isinstance(out, _Failed)]
    if failed:
        cleanup()
        _gather(mesh, None, group)  # barrier: no rank returns before the cleanup is done everywhere
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
    group: Optional[dist.ProcessGroup] = None,
    _hook: Optional[Callable[[str], None]] = None,
) -> Path:
    """Write this rank's shards of ``trees`` (name -> local tree, laid out by ``specs[name]``).

    Collective: every rank of ``mesh`` calls it with the same names, paths and specs. Returns after
    rank 0 has committed the directory (so any rank may load it right away). ``group``: the
    (gloo) group of the whole world its few collectives use (default: the world's), e.g. one of
    its own for a save running beside the training loop's collectives.
    """
    path, hook = Path(path), _hook or (lambda stage: None)
    described = _attempt(lambda: _describe_all(trees, specs, mesh))
    layouts = _all_ok(mesh, described if isinstance(described, _Failed) else described[0], "describe", group=group)
    if any(set(layout) != set(layouts[0]) for layout in layouts):
        rank = next(r for r, layout in enumerate(layouts) if set(layout) != set(layouts[0]))
        raise CheckpointError(f"sharded save: rank {rank} names other trees than rank 0")
    merged = {name: _merge(name, layouts, described[1][name], mesh) for name in layouts[0]}
    index = [{name: entry for name, (entry, _) in merged.items()}]
    blocks_of_mine = {key: t for _, (_, mine) in merged.items() for key, t in mine.items()}
    is_first = mesh.global_rank == 0
    tmp = _all_ok(mesh, _attempt(lambda: _make_tmp(path, overwrite)) if is_first else None, "create", group=group)[0]

    def write() -> dict:  # hooks run inside the attempt, so a failing one aborts every rank
        hook("tmp_created")
        written = _write_shards(tmp, mesh.global_rank, blocks_of_mine, checksum)
        hook("shards_written")
        return written

    files = _all_ok(mesh, _attempt(write), "write shards",
                    cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True) if is_first else None, group=group)
    outcome = None
    if is_first:
        outcome = _attempt(lambda: _commit(tmp, path, index[0], files, mesh, metadata, checksum, hook))
    _all_ok(mesh, outcome, "commit", group=group)
    return path


def _describe_all(trees: Mapping[str, PyTree], specs: Mapping[str, PyTree], mesh: Mesh) -> tuple[dict, dict]:
    """(this rank's layout of every tree, as JSON would return it; its tensors per tree)."""
    if set(trees) != set(specs):
        raise CheckpointError(f"trees {sorted(trees)} and specs {sorted(specs)} name different trees")
    layouts, held = {}, {}
    for name in trees:
        layouts[name], held[name] = _layout(name, trees[name], specs[name], mesh)
    return json.loads(json.dumps(layouts)), held


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
    file = tmp / shard_file(rank)
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
