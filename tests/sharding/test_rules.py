"""Rules resolution: first free match, one use per mesh axis, errors, and the default tables."""

import math

import pytest

from fastllm import nn, tree
from fastllm.sharding import (
    AXES,
    COMPUTE_RULES,
    STORAGE_RULES,
    Mesh,
    PartitionSpec,
    Rules,
    is_spec,
    local_shape,
    resolve,
    spec_for,
)

MESH = Mesh.abstract(data=2, tensor=2)


def test_first_rule_whose_axis_is_free_wins():
    rules = Rules((("a", "tensor"), ("b", "tensor"), ("b", "data"), ("c", None), ("c", "data")))
    assert spec_for(("a", "b"), (4, 4), MESH, rules) == PartitionSpec("tensor", "data")
    assert spec_for(("b",), (4,), MESH, rules) == PartitionSpec("tensor")
    # a None rule decides the dim: the later ("c", "data") never applies
    assert spec_for(("c", "b"), (4, 4), MESH, rules) == PartitionSpec(None, "tensor")


def test_table_order_decides_between_competing_dims():
    first_mlp = Rules((("mlp", "tensor"), ("experts", "tensor"), ("embed", None)))
    first_experts = Rules((("experts", "tensor"), ("mlp", "tensor"), ("embed", None)))
    axes, shape = ("experts", "mlp", "embed"), (4, 8, 6)
    assert spec_for(axes, shape, MESH, first_mlp) == PartitionSpec(None, "tensor", None)
    assert spec_for(axes, shape, MESH, first_experts) == PartitionSpec("tensor", None, None)


def test_a_mesh_axis_is_used_once_per_tensor():
    rules = Rules((("embed", "data"), ("vocab", ("tensor", "data")), ("vocab", "tensor")))
    assert spec_for(("embed", "embed"), (4, 4), MESH, rules) == PartitionSpec("data", None)
    # the tuple rule needs both axes free; data is taken, so the next vocab rule applies
    assert spec_for(("embed", "vocab"), (4, 4), MESH, rules) == PartitionSpec("data", "tensor")
    assert spec_for(("vocab", "embed"), (8, 4), MESH, rules) == PartitionSpec("tensor", "data")  # table order
    assert spec_for(("vocab", "mlp"), (8, 4), Mesh.abstract(data=2, tensor=2), rules + Rules((("mlp", "data"),))) == (
        PartitionSpec(("tensor", "data"), None)
    )


def test_unknown_logical_name_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.w_up: no rule for logical axes \['embd', 'mpl'\]"):
        spec_for(("mpl", "embd"), (4, 4), MESH, COMPUTE_RULES, path="layers.0.mlp.w_up")


def test_indivisible_dim_is_an_error_naming_path_dim_and_sizes():
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.wk: dim 0 \('kv_heads'\) of size 3 .*'tensor'.*2 ranks"):
        spec_for(("kv_heads", "head_dim", "embed"), (3, 4, 8), MESH, COMPUTE_RULES, path="layers.1.attention.wk")


def test_rules_table_is_validated():
    with pytest.raises(ValueError, match="rule 1"):
        Rules((("embed", None), ("mlp", "model")))
    with pytest.raises(ValueError, match="rule 0"):
        Rules((("embed", ("data", "data")),))
    with pytest.raises(ValueError, match="fallback"):
        Rules((), fallback="model")


def test_fallback_adds_data_on_the_first_dim_it_divides():
    rules = Rules((("mlp", "tensor"), ("embed", None)), fallback="data")
    assert spec_for(("mlp",), (8,), MESH, rules) == PartitionSpec(("tensor", "data"))
    assert spec_for(("mlp", "embed"), (2, 6), MESH, rules) == PartitionSpec("tensor", "data")
    assert spec_for(("embed",), (3,), MESH, rules) == PartitionSpec(None)  # nowhere divisible: replicated


def contract_specs(vocab=32, embed=16, heads=4, kv_heads=2, head_dim=4, mlp=24, layers=2):
    """A tiny parameter tree following the params contract (Llama-style, two blocks, one MoE)."""
    norm = {"scale": nn.Param((embed,), ("embed",))}
    attention = {
        "wq": nn.Param((heads, head_dim, embed), ("heads", "head_dim", "embed")),
        "wk": nn.Param((kv_heads, head_dim, embed), ("kv_heads", "head_dim", "embed")),
        "wv": nn.Param((kv_heads, head_dim, embed), ("kv_heads", "head_dim", "embed")),
        "wo": nn.Param((embed, heads, head_dim), ("embed", "heads", "head_dim")),
        "bq": nn.Param((heads, head_dim), ("heads", "head_dim")),
    }
    mlp_block = {"w_up": nn.Param((mlp, embed), ("mlp", "embed")), "w_down": nn.Param((embed, mlp), ("embed", "mlp"))}
    moe = {
        "router": nn.Param((4, embed), ("experts", "embed")),
        "w_up": nn.Param((4, mlp, embed), ("experts", "mlp", "embed")),
        "w_down": nn.Param((4, embed, mlp), ("experts", "embed", "mlp")),
    }
    blocks = [
        {"attention_norm": norm, "attention": attention, "mlp_norm": norm, "mlp": mlp_block},
        {"attention_norm": norm, "attention": attention, "mlp_norm": norm, "moe": moe},
    ]
    return {
        "embed": {"tokens": nn.Param((vocab, embed), ("vocab", "embed"))},
        "layers": blocks[:layers],
        "final_norm": norm,
        "lm_head": {"w": nn.Param((vocab, embed), ("vocab", "embed"))},
    }


def test_compute_rules_give_megatron_tensor_parallel():
    specs = contract_specs()
    flat = tree.flatten(resolve(nn.axes(specs), nn.shapes(specs), MESH, COMPUTE_RULES), is_leaf=is_spec)
    assert flat["embed.tokens"] == ("tensor", None)  # vocab parallel
    assert flat["layers.0.attention.wq"] == ("tensor", None, None)  # column parallel: whole heads
    assert flat["layers.0.attention.wk"] == ("tensor", None, None)
    assert flat["layers.0.attention.wo"] == (None, "tensor", None)  # row parallel
    assert flat["layers.0.mlp.w_up"] == ("tensor", None) and flat["layers.0.mlp.w_down"] == (None, "tensor")
    assert flat["layers.1.moe.w_up"] == (None, "tensor", None)  # experts replicated: each expert's mlp split
    assert flat["final_norm.scale"] == (None,)
    assert all("data" not in spec.used_axes for spec in flat.values())


def test_storage_rules_shard_every_parameter_over_data():
    specs = contract_specs()
    flat = tree.flatten(resolve(nn.axes(specs), nn.shapes(specs), MESH, STORAGE_RULES), is_leaf=is_spec)
    # data nests inside tensor on dim 0: a storage block is whole rows of the compute shard
    assert flat["layers.0.attention.wq"] == (("tensor", "data"), None, None)
    assert flat["layers.0.attention.wo"] == ("data", "tensor", None)
    assert flat["layers.0.attention.bq"] == (("tensor", "data"), None)
    assert flat["final_norm.scale"] == ("data",)
    for path, spec in flat.items():
        assert "data" in spec.used_axes, path


@pytest.mark.parametrize("rules", [COMPUTE_RULES, STORAGE_RULES], ids=["compute", "storage"])
def test_shards_add_up_to_the_model_times_its_replication(rules):
    specs = contract_specs()
    mesh = Mesh.abstract(pipe=1, data=2, tensor=2)
    resolved = resolve(nn.axes(specs), nn.shapes(specs), mesh, rules)
    for (path, param), spec in zip(tree.leaves_with_path(specs, is_leaf=nn.is_param), tree.leaves(resolved, is_leaf=is_spec)):
        replicas = math.prod(mesh.size(a) for a in AXES if a not in spec.used_axes)
        per_rank = math.prod(local_shape(param.shape, spec, mesh, name=path))
        assert per_rank * mesh.world_size == param.numel * replicas, path


def test_resolve_accepts_tensors_and_plain_tables_and_checks_structure():
    import torch

    axes = {"w": ("mlp", "embed"), "b": ("mlp",)}
    params = {"w": torch.zeros(8, 4), "b": torch.zeros(8)}
    specs = resolve(axes, params, MESH, (("mlp", "tensor"), ("embed", "data")))
    assert specs == {"w": ("tensor", "data"), "b": ("tensor",)}
    with pytest.raises(ValueError, match="b: in the axes tree but not in the shapes tree"):
        resolve(axes, {"w": (8, 4)}, MESH, COMPUTE_RULES)
    with pytest.raises(ValueError, match="c: in the shapes tree but not in the axes tree"):
        resolve(axes, {"w": (8, 4), "b": (8,), "c": (2,)}, MESH, COMPUTE_RULES)
    with pytest.raises(ValueError, match="w: logical axes .* differ in rank"):
        resolve(axes, {"w": (8,), "b": (8,)}, MESH, COMPUTE_RULES)


def test_default_tables_cover_every_model_preset():
    """Every logical name the models use has a rule; ZeRO-3 storage gives each weight a data shard."""
    from fastllm import models

    mesh = Mesh.abstract(data=2)
    for name in models.PRESETS:
        config = models.preset(name, n_layers=1)  # every block alike: one is enough, and fast
        specs = models.param_specs(config)
        for rules in (COMPUTE_RULES, STORAGE_RULES):
            resolved = resolve(models.logical_axes(config), nn.shapes(specs), mesh, rules)
            for (path, param), spec in zip(
                tree.leaves_with_path(specs, is_leaf=nn.is_param), tree.leaves(resolved, is_leaf=is_spec)
            ):
                shardable = any(size % 2 == 0 for size in param.shape)
                assert ("data" in spec.used_axes) == (rules is STORAGE_RULES and shardable), (name, path, spec)


def test_kv_heads_fewer_than_tensor_ranks_can_be_replicated_by_a_rule():
    from fastllm import models

    config = models.PRESETS["starcoder-1b"]  # multi-query attention: one kv head
    mesh = Mesh.abstract(tensor=2)
    axes, shapes = models.logical_axes(config), nn.shapes(models.param_specs(config))
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.\w+: dim 0 \('kv_heads'\) of size 1 .*pad it, or put"):
        resolve(axes, shapes, mesh, COMPUTE_RULES)
    flat = tree.flatten(resolve(axes, shapes, mesh, Rules((("kv_heads", None),)) + COMPUTE_RULES), is_leaf=is_spec)
    assert flat["layers.0.attention.wk"] == (None, None, None) and flat["layers.0.attention.wq"][0] == "tensor"
