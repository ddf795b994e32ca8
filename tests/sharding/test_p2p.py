"""The copy-engine transport's host-side pieces (its transfers need CUDA peers: the GPU runs of
tests/distributed/nccl_partitioner.py check them against one process)."""

import pytest
import torch

from fastllm.sharding import Mesh, Partitioner
from fastllm.sharding.p2p import Shadow, copy_engine_unavailable, shadow_layout

BLOCKS = {"layers.0.wq": (torch.Size([3, 5]), "layers.0"), "layers.0.norm": (torch.Size([7]), "layers.0"),
          "lm_head": (torch.Size([100]), "lm_head")}


def test_shadow_layout_aligns_blocks_and_sums_parts():
    offsets, part_size, total = shadow_layout(BLOCKS)
    assert offsets == {"layers.0.wq": 0, "layers.0.norm": 64, "lm_head": 128}
    assert part_size == {"layers.0": 128, "lm_head": 128} and total == 256


def masters() -> dict:
    return {path: torch.randn(shape) for path, (shape, _) in BLOCKS.items()}


def test_shadow_casts_masters_into_fixed_leaf_views():
    shadow = Shadow(BLOCKS, torch.full((256,), float("nan"), dtype=torch.bfloat16))
    values = masters()
    views = dict(shadow.views)
    shadow.write(values)
    for path, view in shadow.views.items():
        assert view is views[path]  # made once: the same leaves every step
        assert view.is_leaf and view.requires_grad and view.grad_fn is None  # autograd never reaches masters
        assert torch.equal(view, values[path].to(torch.bfloat16))
        assert view.data_ptr() == shadow.buffer.data_ptr() + shadow.offsets[path] * 2
    assert shadow.holds(list(BLOCKS), tuple(shadow.views.values()))
    assert not shadow.holds(["lm_head"], (values["lm_head"],))
    with pytest.raises(ValueError, match="flat buffer of 256"):
        Shadow(BLOCKS, torch.empty(255))


def test_transport_names_are_checked_and_shown():
    mesh = Mesh.local()  # one process: the transport only matters with data > 1
    with pytest.raises(ValueError, match="transport must be one of"):
        Partitioner(mesh, zero_stage=3, transport="nvlink")
    assert "transport='nccl'" in repr(Partitioner(mesh, zero_stage=3, transport="nccl"))
    assert copy_engine_unavailable(mesh) == "the data axis has one rank"
