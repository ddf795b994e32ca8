import pytest
import torch

from fastllm import tree


def sample():
    return {"embed": torch.zeros(2), "layers": [{"w": torch.ones(1)}, {"w": torch.full((1,), 2.0)}]}


def test_flatten_unflatten_round_trip_keeps_lists():
    flat = tree.flatten(sample())
    assert list(flat) == ["embed", "layers.0.w", "layers.1.w"]
    back = tree.unflatten(flat)
    assert isinstance(back["layers"], list) and len(back["layers"]) == 2
    assert torch.equal(back["layers"][1]["w"], torch.full((1,), 2.0))


def test_unflatten_rejects_leaf_used_as_parent():
    with pytest.raises(ValueError, match="nests under the leaf"):
        tree.unflatten({"a": 1, "a.b": 2})


def test_partition_combine():
    params = sample()
    picked, rest = tree.partition(params, lambda path, _: path.startswith("layers"))
    assert picked["embed"] is None and rest["layers"][0]["w"] is None
    merged = tree.combine(picked, rest)
    for (pa, a), (pb, b) in zip(tree.leaves_with_path(merged), tree.leaves_with_path(params)):
        assert pa == pb and a is b


def test_map_with_path_sees_dotted_paths():
    seen = tree.map_with_path(lambda path, x: path, sample())
    assert seen["layers"][1]["w"] == "layers.1.w"
