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

The package: :mod:`.layout` (the index format, which rank writes which block, spec trees),
:mod:`.write` (``save``, collective) and :mod:`.read` (``load``, ``load_full``, no collectives).
"""

from fastllm.checkpoint.store import CheckpointError
from fastllm.sharding.checkpoint.layout import FORMAT, INDEX, state_specs
from fastllm.sharding.checkpoint.read import is_sharded, load, load_full, read_index
from fastllm.sharding.checkpoint.write import save

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
