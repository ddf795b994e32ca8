"""Which checkpoint a run resumes from, and what becomes of the ones it cannot use.

The newest ``step-*`` checkpoint that **verifies** is taken: its ``COMPLETE`` manifest lists every
file with its size and sha256 and every file matches, and its metadata (the sharded index or
``metadata.json``) holds the step its name says and the random key. A newer one that does not
verify (truncated, a file missing, no ``COMPLETE``, metadata broken, a flipped bit) is **skipped**,
with the reason said, and **set aside**: renamed ``step-00000006.damaged-1``, never deleted, so
that neither the save that reaches its step again nor the pruning of old checkpoints removes it.

When checkpoints exist but none verifies, the run refuses to start and changes nothing: starting
from step 0 would silently throw away the run; ``run.resume=false`` says to do that on purpose.

Under a mesh rank 0 verifies (reading every file once) and sets aside, then tells the other ranks
which checkpoint to load over the control group, so all ranks resume from the same one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from fastllm import checkpoint
from fastllm.checkpoint import CheckpointError
from fastllm.errors import one_line
from fastllm.sharding import checkpoint as sharded
from fastllm.train.checkpointing import checkpoint_dir

__all__ = ["Choice", "verify", "choose", "set_aside", "agreed_choice"]


@dataclass
class Choice:
    path: Optional[Path] = None  # the checkpoint to resume from; None: start at step 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint, why), newest first
    set_aside: list[str] = field(default_factory=list)  # the names the skipped ones were given


def verify(path: Path) -> None:
    """Raise :class:`CheckpointError` naming what is wrong with the checkpoint at ``path``."""
    try:
        if sharded.is_sharded(path):
            meta = sharded.read_index(path, checksum=True)["metadata"]
        else:
            meta = checkpoint.load(path, names=[], checksum=True)[1]
        step, key = int(meta["step"]), meta["key"]
        if step != checkpoint.step_of(path):
            raise CheckpointError(f"checkpoint {path}: its metadata says step {step}")
        int(key["seed"]), list(key["path"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path}: broken metadata ({type(error).__name__}: {error})") from None


def _candidates(run_dir: Path) -> list[Path]:
    """Every ``step-*`` directory, newest first, complete or not."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    named = []
    for path in directory.iterdir():
        try:
            named.append((checkpoint.step_of(path), path))
        except ValueError:
            continue  # leftovers of crashed saves, damaged ones set aside, anything else
    return [path for _, path in sorted(named, reverse=True)]


def choose(run_dir: Path) -> Choice:
    """The newest checkpoint that verifies and the newer ones skipped (changes nothing)."""
    choice = Choice()
    for path in _candidates(run_dir):
        try:
            verify(path)
        except CheckpointError as error:
            reason = one_line(error).removeprefix(f"checkpoint {path}").removeprefix(":").removeprefix(" is").strip()
            choice.skipped.append((path.name, reason))
            continue
        choice.path = path
        return choice
    if choice.skipped:
        reasons = "; ".join(f"{name}: {why}" for name, why in choice.skipped)
        raise CheckpointError(f"{checkpoint_dir(run_dir)}: no checkpoint verifies ({reasons}); nothing was "
                              "changed: move them away, or set run.resume=false to start again from step 0")
    return choice


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``<name>.damaged-<n>`` (the first free n)."""
    n = 1
    while path.with_name(f"{path.name}.damaged-{n}").exists():
        n += 1
    target = path.with_name(f"{path.name}.damaged-{n}")
    path.rename(target)
    return target


def agreed_choice(run_dir: Path, rank: int, group: Optional[dist.ProcessGroup]) -> Choice:
    """Rank 0's choice (damaged checkpoints set aside), the same on every rank of ``group``."""
    box: list = [None]
    if rank == 0:
        try:
            choice = choose(run_dir)
            choice.set_aside = [set_aside(checkpoint_dir(run_dir) / name).name for name, _ in choice.skipped]
            box[0] = choice
        except CheckpointError as error:
            box[0] = error
    if group is not None:
        dist.broadcast_object_list(box, src=0, group=group)
    if isinstance(box[0], CheckpointError):
        raise box[0]
    return box[0]
