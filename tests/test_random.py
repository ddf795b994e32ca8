import torch

from fastllm import nn, random


def test_same_key_same_values_and_paths_independent():
    k = random.key(0)
    a = random.normal(random.fold_in(k, "a"), (1000,))
    assert torch.equal(a, random.normal(random.fold_in(k, "a"), (1000,)))
    b = random.normal(random.fold_in(k, "b"), (1000,))
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.1
    assert random.fold_in(k, "x.y") == random.fold_in(k, "x", "y")


def test_init_depends_only_on_seed_and_path():
    specs = {"w": nn.Param((4, 3), ("mlp", "embed"), nn.param.normal(0.02)),
             "b": nn.Param((4,), ("mlp",), nn.param.zeros())}
    reordered = {"b": specs["b"], "w": specs["w"]}
    one = nn.init(specs, random.key(7))
    two = nn.init(reordered, random.key(7))
    assert torch.equal(one["w"], two["w"])
    assert not torch.equal(one["w"], nn.init(specs, random.key(8))["w"])
    meta = nn.init(specs, random.key(7), device="meta")
    assert meta["w"].is_meta and meta["w"].shape == (4, 3)
    assert nn.axes(specs)["w"] == ("mlp", "embed")
    assert nn.count(specs) == 16
