"""Checkpoints: atomic, self-describing directories of safetensors files.

Layout of one checkpoint (``save(path, trees, metadata)``)::

    step-00001000/
      params.safetensors      one file per tree, tensors under flat dotted names
      opt_state.safetensors   ("layers.3.attention.wq", "1.0.mu.embed.tokens", ...)
      metadata.json           {"format", "trees": {name: {"file", "tensors", "scalars"}}, "metadata"}
      COMPLETE                manifest {"format", "files": {name: {"bytes", "sha256"}}}, written last

Atomicity. Everything is written into ``step-00001000.tmp-<pid>`` (files fsync'd), ``COMPLETE`` is
written last, the directory is fsync'd and then renamed into place with ``os.replace``, and the
parent directory is fsync'd. A crash at any point leaves either no ``step-00001000`` at all (only a
``.tmp-<pid>`` leftover, which :func:`latest` ignores and ``prune(..., remove_partial=True)``
removes) or a complete one. ``load`` also refuses a directory whose ``COMPLETE`` is missing, whose
files are missing or have the wrong size (truncated) or fail their sha256 (corrupted), with a
:class:`CheckpointError` naming the directory and the file. ``overwrite=True`` moves the old
directory aside (``.old-<pid>``) before the rename and deletes it after.

Trees. A tree is a pytree (dicts, lists, tuples, NamedTuples) of tensors and Python scalars.
Tensors keep their dtype (bf16, fp32, int64, 0-d included) and are saved from the CPU. Python
``bool``/``int``/``float``/``str`` leaves (an optimizer step count, a loss-scale interval) are stored
in ``metadata.json`` under ``trees.<name>.scalars`` and come back with their type. ``None`` and
empty containers are not leaves and are not stored.

Structure on load. Without a template, ``load`` rebuilds nested dicts with
:func:`fastllm.tree.unflatten`, where a level keyed ``0..n-1`` becomes a list (so a params tree
round-trips exactly; a NamedTuple or tuple comes back as a list). Pass ``like={name: template}``
(e.g. ``opt.init(params)``, even on the ``meta`` device) to get the template's exact structure back;
paths and tensor shapes are checked against the template and a mismatch names the path.

API::

    save(path, trees, metadata=None, *, overwrite=False, checksum=True) -> Path
    load(path, like=None, *, names=None, device="cpu", checksum=True) -> (trees, metadata)
    verify(path, checksum=True) -> manifest       is_complete(path) -> bool
    step_dir(run_dir, step) -> run_dir/step-XXXXXXXX      step_of(path) -> int
    checkpoints(run_dir) -> complete checkpoints, oldest first
    latest(run_dir) -> newest complete checkpoint or None
    prune(run_dir, keep, *, remove_partial=False) -> removed paths

Typical use in a one-process trainer (under a mesh every rank writes its own shards instead, with
:mod:`fastllm.sharding.checkpoint`, into the same ``step-XXXXXXXX`` names; ``step_dir``, ``latest``
and ``prune`` serve both)::

    checkpoint.save(checkpoint.step_dir(run, step),
                    {"params": params, "opt_state": opt_state}, {"step": step, "config": ...})
    checkpoint.prune(run, keep=3)
    ...
    if (last := checkpoint.latest(run)) is not None:
        trees, meta = checkpoint.load(last, like={"params": params, "opt_state": opt_state})
"""

from fastllm.checkpoint.runs import checkpoints, latest, prune, step_dir, step_of
from fastllm.checkpoint.store import FORMAT, CheckpointError, is_complete, load, save, verify

__all__ = [
    "save",
    "load",
    "verify",
    "is_complete",
    "CheckpointError",
    "FORMAT",
    "step_dir",
    "step_of",
    "checkpoints",
    "latest",
    "prune",
]
