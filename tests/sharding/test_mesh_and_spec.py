"""Mesh coordinates, PartitionSpec validation, local shapes and shard slicing, in one process."""

import math

import pytest
import torch

from fastllm.sharding import AXES, Mesh, PartitionSpec, collectives, local_shape, shard, unshard


def test_single_process_mesh_needs_no_distributed_init():
    mesh = Mesh(data=-1)
    assert mesh.shape == {"pipe": 1, "data": 1, "tensor": 1} and mesh.world_size == 1
    assert [mesh.size(a) for a in AXES] == [1, 1, 1] and mesh.rank("data") == 0
    assert mesh.group("tensor") is None
    x = torch.randn(4, 6, requires_grad=True)
    y = collectives.all_gather(collectives.copy_to_parallel(x, "tensor", mesh), 1, "tensor", mesh)
    y = collectives.reduce_scatter(collectives.all_reduce(y, "data", mesh), 0, "data", mesh)
    y = collectives.all_to_all(collectives.split(y, 1, "tensor", mesh), 0, 1, "tensor", mesh)
    (y * 3).sum().backward()
    assert torch.equal(y, x) and torch.equal(x.grad, torch.full_like(x, 3.0))
    spec = PartitionSpec("data", "tensor")
    assert torch.equal(unshard(shard(x, spec, mesh), spec, mesh), x)


def test_from_env_without_torchrun_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    mesh = Mesh.from_env(data=-1, tensor=1, pipe=1)
    assert mesh.world_size == 1 and not mesh.is_abstract and mesh.device.type == "cpu"
    with pytest.raises(ValueError, match="multiply to 4 ranks"):
        Mesh.from_env(data=2, tensor=2)


def test_rank_order_is_tensor_fastest_then_data_then_pipe():
    shape = dict(pipe=2, data=3, tensor=2)
    grid = [Mesh.abstract(**shape, rank=r).coords for r in range(12)]
    expected = [
        {"pipe": p, "data": d, "tensor": t} for p in range(2) for d in range(3) for t in range(2)
    ]
    assert grid == expected
    mesh = Mesh.abstract(**shape, rank=7)  # pipe 1, data 0, tensor 1
    assert mesh.ranks("tensor") == [6, 7] and mesh.ranks("data") == [7, 9, 11] and mesh.ranks("pipe") == [1, 7]
    assert all(mesh.rank_of(mesh.coords_of(r)) == r for r in range(12))
    assert mesh.rank(("data", "tensor")) == 1 and mesh.size(("data", "tensor")) == 6


def test_mesh_size_errors_name_the_problem():
    with pytest.raises(ValueError, match="multiply to 2 ranks but the world has 1"):
        Mesh(data=2)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        Mesh(data=-1, tensor=None)
    with pytest.raises(ValueError, match="'tensor' needs a size >= 1"):
        Mesh(tensor=0)
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        Mesh().size("model")
    with pytest.raises(ValueError, match="needs every size >= 1"):
        Mesh.abstract(data=-1)
    with pytest.raises(RuntimeError, match="abstract mesh has no process groups"):
        Mesh.abstract(data=2).group("data")


def test_partition_spec_normalises_and_validates():
    assert PartitionSpec(("tensor",), None, ()) == ("tensor", None, None)
    assert PartitionSpec(("data", "tensor")).axes(0) == ("data", "tensor")
    with pytest.raises(ValueError, match=r"uses mesh axes \['tensor'\] more than once"):
        PartitionSpec("tensor", ("data", "tensor"))
    with pytest.raises(ValueError, match="unknown mesh axes"):
        PartitionSpec("model")
    with pytest.raises(TypeError):
        PartitionSpec(3)


def test_local_shape_and_divisibility_error():
    mesh = Mesh.abstract(data=2, tensor=4)
    assert local_shape((16, 8, 3), PartitionSpec(("data", "tensor"), None, None), mesh) == (2, 8, 3)
    assert local_shape((6, 8), PartitionSpec("data", "tensor"), mesh) == (3, 2)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.w_up: dim 1 of size 6 .*\('tensor',\) \(4 ranks\)"):
        local_shape((8, 6), PartitionSpec(None, "tensor"), mesh, name="layers.0.mlp.w_up")
    with pytest.raises(ValueError, match="has 1 entries but the shape"):
        local_shape((8, 6), PartitionSpec(None), mesh)


@pytest.mark.parametrize(
    "spec", [("data", None), (("data", "tensor"), None), (("tensor", "data"), "pipe"), ("tensor", "data"), (None, None)]
)
def test_shards_of_all_ranks_tile_the_tensor(spec):
    spec = PartitionSpec(*spec)
    sizes = dict(pipe=2, data=2, tensor=2)
    full = torch.arange(8 * 4).reshape(8, 4)
    for rank in range(8):
        mesh = Mesh.abstract(**sizes, rank=rank)
        expected = full
        for dim in range(2):
            for axis in spec.axes(dim):  # major axis first, each cut nested in the previous block
                expected = expected.chunk(sizes[axis], dim)[mesh.coords[axis]]
        got = shard(full, spec, mesh)
        assert torch.equal(got, expected) and got.is_contiguous()
        assert got.untyped_storage().data_ptr() != full.untyped_storage().data_ptr()
    replicas = math.prod(sizes[a] for a in AXES if a not in spec.used_axes)
    counts = torch.zeros(full.numel())
    for rank in range(8):
        counts[shard(full, spec, Mesh.abstract(**sizes, rank=rank)).flatten()] += 1
    assert torch.equal(counts, torch.full_like(counts, replicas))
