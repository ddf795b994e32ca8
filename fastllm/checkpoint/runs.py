"""A run directory holds ``step-XXXXXXXX`` checkpoints; find the newest complete one, prune old ones."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

from fastllm.checkpoint.store import PathLike, is_complete

__all__ = ["step_dir", "step_of", "checkpoints", "latest", "prune"]

_STEP = re.compile(r"^step-(\d{8,})$")
# what a crashed save leaves behind: ``step-N.tmp-<pid>``, ``step-N.old-<pid>``
_PARTIAL = re.compile(r"^step-\d{8,}\.(tmp|old)-\d+$")


def step_dir(run_dir: PathLike, step: int) -> Path:
    """``run_dir/step-00001234``: where the checkpoint of ``step`` lives."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return Path(run_dir) / f"step-{step:08d}"


def step_of(path: PathLike) -> int:
    match = _STEP.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not named step-XXXXXXXX")
    return int(match.group(1))


def checkpoints(run_dir: PathLike) -> list[Path]:
    """Complete ``step-*`` checkpoints of ``run_dir``, oldest first (incomplete ones are skipped)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if _STEP.match(p.name) and is_complete(p)]
    return sorted(found, key=step_of)


def latest(run_dir: PathLike) -> Optional[Path]:
    """The newest complete checkpoint of ``run_dir``, or ``None`` when there is none."""
    complete = checkpoints(run_dir)
    return complete[-1] if complete else None


def prune(run_dir: PathLike, keep: int, *, remove_partial: bool = False) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints; returns what was removed.

    ``remove_partial`` also deletes leftovers of crashed saves (``*.tmp-<pid>``, ``*.old-<pid>``).
    Only use it when no other process is saving into ``run_dir``: an in-progress save looks exactly
    like a crashed one. A ``step-*`` directory that is not complete is never deleted: it was a
    checkpoint once, and what is left of it is for a person to look at. A checkpoint is renamed to
    ``.old-<pid>`` before it is deleted, so a prune killed halfway leaves a leftover, not a
    checkpoint with files missing.
    """
    if keep < 1:
        raise ValueError(f"prune keeps at least one checkpoint, got keep={keep}")
    removed = checkpoints(run_dir)[:-keep]
    for p in removed:
        aside = p.with_name(f"{p.name}.old-{os.getpid()}")
        os.replace(p, aside)
        shutil.rmtree(aside)
    if remove_partial and Path(run_dir).is_dir():
        for p in Path(run_dir).iterdir():
            if _PARTIAL.match(p.name):
                shutil.rmtree(p)
                removed.append(p)
    return removed
