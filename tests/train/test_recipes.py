"""Every recipe builds and validates; overrides are checked against the schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastllm.config import ConfigError, load_recipe
from fastllm.train.config import Config
from fastllm.train.plan import plan_layout

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.py"))
REQUIRED = {"quickstart", "smollm2_135m", "llama3_8b", "mistral_7b", "mixtral_8x7b", "starcoder", "gpt2"}


def test_every_required_recipe_exists():
    assert REQUIRED <= {path.stem for path in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_builds_and_validates(path):
    module, config = load_recipe(path)
    assert isinstance(config, Config)
    model = config.model_config  # the preset resolves with the recipe's overrides (or the recipe's own config)
    if hasattr(module, "model"):
        assert module.model(config).declarations  # a recipe's own model: built from its config
    else:
        assert config.data.seq_len <= model.max_seq_len
    assert config.train.steps > 0 and config.data.datasets
    _, changed = load_recipe(path, ["train.steps=7", "optim.warmup_steps=1", "model.n_layers=2",
                                    "data.datasets=data/a,data/b"])
    assert changed.train.steps == 7 and changed.model_config.n_layers == 2
    assert [spec.path for spec in changed.data.datasets] == ["data/a", "data/b"]


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("train.steps=many", "bad value for train.steps='many': expected an integer"),
    ("train.precision=fp8", "train.precision='fp8': must be one of"),
    ("model.preset=gpt5", "model.preset: unknown preset 'gpt5'"),
    ("model.n_heads=5", "n_heads"),
    ("zero.stage=4", "zero.stage"),
    ("data.seq_len=100000", "data.seq_len: 100000 exceeds the model's max_seq_len"),
    ("optim.betas=0.9", "optim.betas"),
])
def test_bad_override_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(RECIPES[0], [override])


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_layout_is_planned(path):
    """Each recipe's layout on an abstract mesh of its size: the partition plan of its model and a
    dry run of one micro-batch on meta tensors (no processes, no memory). A layout the partitioner
    refuses fails here."""
    module, config = load_recipe(path)
    model = module.model(config) if hasattr(module, "model") else None
    report = plan_layout(config, model)
    assert report.mesh.world_size == config.mesh.data * config.mesh.tensor * config.mesh.pipe
    assert report.description.totals["params"] > 0
    tensor_moves = [c for c in report.collectives if c.axis == "tensor"]
    assert bool(tensor_moves) == (config.mesh.tensor > 1)  # only tensor parallelism moves activations


def test_a_pipelined_layout_plans_with_its_schedule_and_bubble():
    """llama3_8b at data=8 x tensor=4 x pipe=4 (interleaved, 2 virtual stages): the plan dry-runs
    rank 0's stage and prints the step's schedule with its bubble."""
    _, config = load_recipe(RECIPES[[p.stem for p in RECIPES].index("llama3_8b")],
                            ["mesh.data=8", "mesh.tensor=4", "mesh.pipe=4", "pipe.schedule=interleaved",
                             "pipe.virtual_stages=2", "train.batch_size=512", "train.micro_batch_size=4"])
    report = plan_layout(config)
    assert report.timeline is not None and report.grad_accum == 16
    text = str(report)
    assert "pipe 3: " in text and f"bubble {report.timeline.bubble:.1%}" in text
    assert 0 < report.timeline.bubble < 3 / (16 + 3)  # interleaving beats 1F1B's (P - 1) / (M + P - 1)


def test_the_mixtral_recipe_spreads_its_experts_and_moves_tokens_by_all_to_all():
    """Experts over data=8 (one of each layer's 8 per data rank, its hidden units over tensor=2):
    every layer's dispatch and combine are all-to-alls over data, forward and backward."""
    _, config = load_recipe(Path(__file__).parents[2] / "recipes" / "mixtral_8x7b.py")
    report = plan_layout(config)
    assert report.plan.flat_compute["layers.0.moe.w_up"] == ("data", "tensor", None)
    assert report.plan.reduce_axes["layers.0.moe.w_up"] == frozenset()  # each expert sees all its tokens
    assert report.plan.flat_compute["layers.0.moe.router"] == (None, None)
    moves = [c for c in report.collectives if c.kind == "all_to_all"]
    assert {c.axis for c in moves} == {"data"}
    for op in ("moe dispatch", "moe combine"):
        assert sum(c.what.startswith(op) for c in moves) == 2 * config.model_config.n_layers, op
