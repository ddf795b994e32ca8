"""A new architecture composed from fastllm.nn in user code: the GPT-J-style parallel block model of
recipes/gptj_style.py (docs/custom_models.md), used as plain functions.

GPT-J (Wang & Komatsuzaki 2021) runs attention and MLP side by side from one LayerNorm,
``x = x + attention(norm(x)) + mlp(norm(x))``, with partial rotary embeddings and an untied,
biased LM head. Nothing of it is in the library: the recipe file is what a user writes. Its
training on every layout is tests/distributed/test_custom_recipe.py.
"""

import importlib.util
from pathlib import Path

import torch

from fastllm import nn, random, tree


def _recipe():
    path = Path(__file__).parents[2] / "recipes" / "gptj_style.py"
    spec = importlib.util.spec_from_file_location("gptj_style_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECIPE = _recipe()
CONFIG = RECIPE.ParallelConfig(vocab_size=64, embed_dim=32, n_layers=2, mlp_dim=64)


def loss(model, params, tokens):
    return nn.run(model, params, {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]})["loss"]


def test_parallel_block_model_has_axes_for_every_leaf():
    specs = RECIPE.param_specs(CONFIG)
    params = nn.init(specs, random.key(0))
    axes = tree.flatten(nn.axes(specs), is_leaf=tree.is_axes)
    flat = tree.flatten(params)
    assert axes.keys() == flat.keys()
    assert axes["layers.1.attention.wq"] == ("heads", "head_dim", "embed")
    assert axes["layers.0.mlp.b_up"] == ("mlp",)
    assert axes["lm_head.w"] == ("vocab", "embed") and axes["lm_head.b"] == ("vocab",)
    known = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp"}
    assert all(set(names) <= known for names in axes.values())
    # The two layers share a declaration but not their values: each path has its own stream.
    assert not torch.equal(flat["layers.0.attention.wq"], flat["layers.1.attention.wq"])


def test_parallel_block_model_trains_under_torch_func():
    config = RECIPE.RecipeConfig(model=CONFIG)
    model = RECIPE.model(config)
    assert [part.layer for part in model.parts] == [None, 0, 1, None]  # the repeated parts: `layers`
    params = nn.init(model.declarations, random.key(0))
    # A learnable pattern: every sequence counts up by 3 modulo the vocabulary.
    starts = torch.randint(0, CONFIG.vocab_size, (8, 1), generator=torch.Generator().manual_seed(0))
    tokens = (starts + 3 * torch.arange(17)) % CONFIG.vocab_size
    grad_fn = torch.func.grad_and_value(lambda p: loss(model, p, tokens))
    first = None
    for _ in range(20):
        grads, value = grad_fn(params)
        first = value.item() if first is None else first
        params = tree.map(lambda p, g: p - 0.5 * g, params, grads)
    final = loss(model, params, tokens).item()
    assert final < 0.5 * first, (first, final)
