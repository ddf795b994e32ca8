"""Sharding: a named device mesh, partition specs, logical-axis rules and autograd collectives.

Model code names the logical dims of its tensors (``embed``, ``heads``, ...); a rules table maps
them onto the mesh axes ``pipe``, ``data``, ``tensor``; the resulting :class:`PartitionSpec` says
which block of each tensor a rank holds. See docs/sharding.md.
"""

from fastllm.sharding import collectives
from fastllm.sharding.collectives import (
    all_gather,
    all_reduce,
    all_to_all,
    copy_to_parallel,
    reduce_scatter,
    split,
)
from fastllm.sharding.describe import Description, describe
from fastllm.sharding.mesh import AXES, Mesh
from fastllm.sharding.layout import MeshLayout
from fastllm.sharding.partitioner import Partitioner, Plan
from fastllm.sharding.placement import Placement, transitions
from fastllm.sharding.rules import COMPUTE_RULES, STORAGE_RULES, Rule, Rules, assign, resolve, spec_for
from fastllm.sharding.spec import PartitionSpec, is_spec, local_shape, shard, unshard

__all__ = [
    "AXES",
    "Mesh",
    "PartitionSpec",
    "is_spec",
    "local_shape",
    "shard",
    "unshard",
    "Rule",
    "Rules",
    "COMPUTE_RULES",
    "STORAGE_RULES",
    "resolve",
    "spec_for",
    "assign",
    "Placement",
    "transitions",
    "MeshLayout",
    "Partitioner",
    "Plan",
    "describe",
    "Description",
    "collectives",
    "all_gather",
    "reduce_scatter",
    "all_reduce",
    "copy_to_parallel",
    "split",
    "all_to_all",
]
