"""Single-process partitioner tests on abstract meshes: sharded init, describe vs allocation, errors."""

import math

import pytest
import torch

from fastllm import models, optim, random, tree
from fastllm.sharding import COMPUTE_RULES, Mesh, MeshLayout, Partitioner, Rules, describe, shard
from fastllm.sharding.spec import is_spec
from fastllm.train.step import TrainStep

CONFIG = models.preset("tiny-qwen2")  # tied embeddings, qkv biases, 2 KV heads
MODEL = models.model(CONFIG)  # the partitioner takes the model's declarations: sharding never imports models
SPECS = MODEL.declarations


def nbytes(values) -> int:
    return sum(t.numel() * t.element_size() for t in tree.leaves(values) if t.ndim > 0)


@pytest.mark.parametrize("stage", [0, 3])
def test_sharded_init_is_the_slice_of_the_full_init_on_every_rank(stage):
    key = random.key(3)
    full = tree.flatten(models.init(CONFIG, key))
    pieces = {}
    for rank in range(4):
        mesh = Mesh.abstract(data=2, tensor=2, rank=rank)
        partitioner = Partitioner(mesh, zero_stage=stage)
        specs = tree.flatten(partitioner.param_specs(SPECS), is_leaf=is_spec)
        local = tree.flatten(partitioner.init_params(SPECS, key))
        for path, value in local.items():
            assert torch.equal(value, shard(full[path], specs[path], mesh)), path
            pieces.setdefault(path, []).append(value)
    for path, value in full.items():  # the shards cover the tensor: 4 ranks hold numel * replicas
        spec = specs[path]
        replicas = 4 // Mesh.abstract(data=2, tensor=2).size(spec.used_axes)
        assert sum(p.numel() for p in pieces[path]) == value.numel() * replicas, path


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_describe_matches_what_a_rank_allocates(stage):
    mesh = Mesh.abstract(data=2, tensor=2, rank=3)
    partitioner = Partitioner(mesh, zero_stage=stage)
    opt = optim.adamw(1e-3)
    state = TrainStep(MODEL, partitioner, opt).init_state(random.key(0))
    totals = partitioner.describe(SPECS).totals
    assert totals["params"] == nbytes(state.params)
    assert totals["optimizer"] == nbytes(state.opt_state)
    full = models.param_count(CONFIG) * 4
    assert totals["grads"] == (nbytes(state.params) if stage != 2 else totals["optimizer"] // 2)
    if stage == 3:  # everything is split 4 ways but the 64-wide norms and biases over data only
        assert full / 4 <= totals["params"] < full / 3.5


def test_describe_table_names_every_parameter():
    text = str(describe(models.param_specs(models.preset("llama3-8b")), Mesh.abstract(data=8, tensor=8), zero_stage=3))
    assert "layers.31.attention.wq" in text and "(tensor, data, None)" in text  # 4 local heads: data takes head_dim
    assert "per rank: params" in text and "optimizer" in text
    d = describe(models.param_specs(models.preset("llama3-8b")), Mesh.abstract(data=8, tensor=8), zero_stage=3)
    assert d.totals["params"] == sum(math.prod(r.local_shape) * 4 for r in d.rows)
    assert d.totals["optimizer"] == 2 * d.totals["grads"] == 2 * d.totals["params"]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"repeated parts \(layers\) cannot fill 8 pipeline chunks"):
        Partitioner(Mesh.abstract(pipe=8)).plan(MODEL)
    with pytest.raises(ValueError, match="zero_stage"):
        Partitioner(Mesh.abstract(data=2), zero_stage=4)
    # embed after batch: where weights meet tokens, batch takes data first, so a weight cannot hold it
    over_data = COMPUTE_RULES.replace("embed", "data")
    with pytest.raises(ValueError, match=r"embed\.tokens: the rules split it over \['data'\].*before 'batch'"):
        Partitioner(Mesh.abstract(data=2, tensor=2), rules=over_data).plan(MODEL)
    with pytest.raises(TypeError, match=r"fastllm.models.model\(config\)"):
        Partitioner(Mesh.abstract(data=2)).plan(CONFIG)
    with pytest.raises(ValueError, match="kv_heads"):
        Partitioner(Mesh.abstract(tensor=4)).plan(MODEL)  # 2 KV heads over 4 ranks
    with pytest.raises(ValueError, match=r"rules name dims that nothing has: \['sq'\]"):
        Partitioner(Mesh.abstract(tensor=2), rules=COMPUTE_RULES.replace("sq", "tensor")).plan(MODEL)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-mixtral"])
def test_a_layout_on_one_process_computes_the_same_loss(name):
    """Every operation through a layout whose mesh has one rank is the plain computation."""
    config = models.preset(name)
    params = models.init(config, random.key(0))
    tokens = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
    layout = MeshLayout(Mesh.local(), COMPUTE_RULES.replace("seq", "tensor"))
    expected, _ = models.loss(config, params, batch)
    actual, _ = models.loss(config, params, batch, layout=layout)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0)


def test_zero3_blocks_are_whole_rows_so_gathers_and_scatters_need_no_copy():
    """With the default storage rules every Llama weight splits over data along dim 0, so the
    gathered ``[ranks, block]`` buffer *is* the compute weight and a gradient *is* its rows."""
    import torch

    from fastllm.sharding import Partitioner
    from fastllm.sharding.overlap import from_rows, to_rows

    config = models.preset("tiny-llama")
    plan = Partitioner(Mesh.abstract(data=2), zero_stage=3).plan(models.model(config))
    assert set(plan.data_dims.values()) == {0}, plan.data_dims
    full = torch.randn(8, 3, 5)
    rows = to_rows(full, 0, 2)
    assert rows.data_ptr() == full.data_ptr() and rows.shape == (2, 60)  # a view: nothing packed
    back = from_rows(rows, 0, torch.Size((4, 3, 5)))
    assert back.data_ptr() == rows.data_ptr() and torch.equal(back, full)  # a view: nothing unpacked
    other = from_rows(to_rows(full, 1, 3), 1, torch.Size((8, 1, 5)))  # another dim still works, by copy
    assert torch.equal(other, full)


MIXTRAL = models.model(models.preset("tiny-mixtral"))  # 4 experts


def test_experts_over_data_sit_on_one_rank_each_and_sum_no_gradient_over_data():
    """('experts', 'data') before 'batch': each expert's weights on one data rank, its hidden units over
    tensor (expert tensor parallelism), no ZeRO split (no other rank holds it), no gradient sum over
    data (every token routed to it comes to it); the router stays whole and ZeRO-split over data."""
    plan = Partitioner(Mesh.abstract(data=2, tensor=2), rules=COMPUTE_RULES.replace("experts", "data"),
                       zero_stage=3).plan(MIXTRAL)
    assert plan.flat_compute["layers.0.moe.w_up"] == ("data", "tensor", None)
    assert plan.flat_compute["layers.0.moe.w_down"] == ("data", None, "tensor")
    assert plan.flat_storage["layers.0.moe.w_up"] == ("data", "tensor", None)
    assert plan.reduce_axes["layers.0.moe.w_up"] == frozenset()
    assert plan.flat_compute["layers.0.moe.router"] == (None, None)
    assert plan.flat_storage["layers.0.moe.router"] == ("data", None)
    assert plan.reduce_axes["layers.0.moe.router"] == {"data"}
    sp = Partitioner(Mesh.abstract(data=2, tensor=2), rules=COMPUTE_RULES.replace("experts", "data").replace(
        "seq", "tensor")).plan(MIXTRAL)
    assert sp.reduce_axes["layers.0.moe.w_up"] == frozenset()  # the routed rows come whole over tensor too
    assert sp.reduce_axes["layers.0.moe.router"] == {"data", "tensor"}


def test_experts_over_tensor_are_zero_split_over_the_data_ranks_that_share_them():
    plan = Partitioner(Mesh.abstract(data=2, tensor=2), rules=COMPUTE_RULES.replace("experts", "tensor"),
                       zero_stage=3).plan(MIXTRAL)
    assert plan.flat_compute["layers.0.moe.w_up"] == ("tensor", None, None)  # experts took tensor first
    assert plan.flat_storage["layers.0.moe.w_up"] == (("tensor", "data"), None, None)
    assert plan.reduce_axes["layers.0.moe.w_up"] == {"data"}


def test_an_experts_rule_after_batch_is_an_error_naming_the_fix():
    table = tuple(rule for rule in COMPUTE_RULES.table if rule[0] != "experts") + (("experts", "data"),)
    with pytest.raises(ValueError, match=r"layers\.0\.moe\.w_down: .*put the rule of its dim before 'batch'"):
        Partitioner(Mesh.abstract(data=2), rules=Rules(table)).plan(MIXTRAL)
