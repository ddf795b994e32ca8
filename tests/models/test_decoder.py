"""The decoder family: tree contract, init, determinism, packing, dtypes, torch.func."""

import math
import warnings

import pytest
import torch

from fastllm import models, nn, random, tree

TINY = ["tiny-llama", "tiny-gpt2", "tiny-starcoder", "tiny-mistral", "tiny-mixtral", "tiny-qwen2"]


def _batch(config, batch=2, seq=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=gen)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}


def test_llama_block_names_and_axes_equal_the_contract():
    axes = models.logical_axes(models.preset("tiny-llama"))
    assert axes["layers"][0] == {
        "attention_norm": {"scale": ("embed",)},
        "attention": {
            "wq": ("heads", "head_dim", "embed"),
            "wk": ("kv_heads", "head_dim", "embed"),
            "wv": ("kv_heads", "head_dim", "embed"),
            "wo": ("embed", "heads", "head_dim"),
        },
        "mlp_norm": {"scale": ("embed",)},
        "mlp": {"w_up": ("mlp", "embed"), "w_gate": ("mlp", "embed"), "w_down": ("embed", "mlp")},
    }
    assert axes["embed"] == {"tokens": ("vocab", "embed")}
    assert axes["final_norm"] == {"scale": ("embed",)}
    assert axes["lm_head"] == {"w": ("vocab", "embed")}


def test_gpt2_tree_has_positions_biases_and_no_lm_head():
    flat = tree.flatten(models.init(models.preset("tiny-gpt2"), random.key(0)))
    assert "embed.positions" in flat and "lm_head.w" not in flat
    for leaf in ("attention.bq", "attention.bk", "attention.bv", "attention.bo", "mlp.b_up",
                 "mlp.b_down", "attention_norm.bias", "mlp_norm.bias"):
        assert f"layers.0.{leaf}" in flat
    assert "layers.0.mlp.w_gate" not in flat and "final_norm.bias" in flat


@pytest.mark.parametrize("name", TINY)
def test_axes_cover_every_leaf_with_matching_rank(name):
    config = models.preset(name)
    params = models.init(config, random.key(0))
    axes = models.logical_axes(config)
    flat_params, flat_axes = tree.flatten(params), tree.flatten(axes, is_leaf=tree.is_axes)
    assert flat_params.keys() == flat_axes.keys()
    for path, value in flat_params.items():
        assert value.dim() == len(flat_axes[path]), path
    if config.moe is not None:
        assert flat_axes["layers.0.moe.w_up"] == ("experts", "mlp", "embed")


@pytest.mark.parametrize("name", TINY)
def test_every_tiny_preset_runs_and_starts_near_uniform(name):
    config = models.preset(name)
    params = models.init(config, random.key(0))
    batch = _batch(config)
    logits = models.apply(config, params, batch["tokens"])
    assert logits.shape == (2, 12, config.vocab_size)
    loss, metrics = models.loss(config, params, batch)
    assert abs(loss.item() - math.log(config.vocab_size)) < 0.5
    assert set(metrics) >= {"loss", "cross_entropy", "moe_aux_loss", "router_z_loss"}
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())
    if config.moe is None:
        assert metrics["moe_aux_loss"].item() == 0.0
    else:  # balanced routing gives about top_k (f_e counts all k assignments, as transformers)
        assert 0.9 * config.moe.top_k < metrics["moe_aux_loss"].item() < 1.5 * config.moe.top_k
        assert loss.item() > metrics["cross_entropy"].item()


def test_init_is_deterministic_and_paths_are_independent():
    config = models.preset("tiny-llama")
    a, b = models.init(config, random.key(3)), models.init(config, random.key(3))
    c = models.init(config, random.key(4))
    flat_a, flat_b, flat_c = tree.flatten(a), tree.flatten(b), tree.flatten(c)
    assert all(torch.equal(flat_a[p], flat_b[p]) for p in flat_a)
    assert not torch.equal(flat_a["layers.0.attention.wq"], flat_c["layers.0.attention.wq"])
    # Same shape, different paths: independent draws.
    assert not torch.equal(flat_a["layers.0.attention.wk"], flat_a["layers.1.attention.wk"])
    assert not torch.equal(flat_a["layers.0.attention.wk"], flat_a["layers.0.attention.wv"])
    # A value depends on (seed, path) only: a deeper model shares its first layers' values.
    deeper = tree.flatten(models.init(config.replace(n_layers=3), random.key(3)))
    assert torch.equal(deeper["layers.1.mlp.w_up"], flat_a["layers.1.mlp.w_up"])


@pytest.mark.parametrize("name, scaled", [("tiny-llama", False), ("tiny-gpt2", True)])
def test_init_statistics_follow_the_family_convention(name, scaled):
    config = models.preset(name, embed_dim=128, mlp_dim=512, n_layers=8, init_std=0.02)
    flat = tree.flatten(models.init(config, random.key(0)))
    out_std = 0.02 / math.sqrt(2 * 8) if scaled else 0.02
    for path in ("embed.tokens", "layers.0.attention.wq", "layers.0.mlp.w_up"):
        assert abs(flat[path].std().item() - 0.02) < 0.001, path
        assert abs(flat[path].mean().item()) < 0.001, path
    for path in ("layers.0.attention.wo", "layers.0.mlp.w_down"):
        assert abs(flat[path].std().item() - out_std) < 0.05 * out_std, path
    assert torch.equal(flat["final_norm.scale"], torch.ones(128))
    for path, value in flat.items():
        if path.rsplit(".", 1)[-1].startswith("b") and path != "final_norm.scale":
            assert torch.count_nonzero(value) == 0, path


def test_meta_init_of_llama3_8b_allocates_nothing():
    config = models.preset("llama3-8b")
    params = models.init(config, random.key(0), dtype=torch.bfloat16, device="meta")
    leaves = tree.leaves(params)
    assert all(t.is_meta and t.dtype == torch.bfloat16 for t in leaves)
    assert sum(t.numel() for t in leaves) == 8_030_261_248
    assert params["layers"][31]["attention"]["wk"].shape == (8, 128, 4096)


def test_packed_documents_equal_separate_runs():
    config = models.preset("tiny-llama")
    params = models.init(config, random.key(0))
    doc_a, doc_b = torch.randint(0, 256, (1, 5)), torch.randint(0, 256, (1, 7))
    packed = torch.cat((doc_a, doc_b), dim=1)
    segment_ids = torch.tensor([[0] * 5 + [1] * 7])
    positions = torch.cat((torch.arange(5), torch.arange(7)))[None]
    logits = models.apply(config, params, packed, positions=positions, segment_ids=segment_ids)
    torch.testing.assert_close(logits[:, :5], models.apply(config, params, doc_a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:, 5:], models.apply(config, params, doc_b), atol=1e-5, rtol=1e-5)


def test_sliding_window_layers_follow_qwen2_max_window_layers():
    from fastllm.models.decoder import layer_window

    config = models.preset("tiny-qwen2", n_layers=4, sliding_window=16, sliding_window_layers=2)
    assert [layer_window(config, i) for i in range(4)] == [None, None, 16, 16]
    mistral = models.preset("tiny-mistral")
    assert [layer_window(mistral, i) for i in range(2)] == [8, 8]


def test_sliding_window_changes_only_far_context():
    config = models.preset("tiny-mistral")  # window 8
    params = models.init(config, random.key(0))
    tokens = torch.randint(0, 256, (1, 20))
    full = models.apply(config.replace(sliding_window=None), params, tokens)
    windowed = models.apply(config, params, tokens)
    torch.testing.assert_close(windowed[:, :8], full[:, :8])
    assert not torch.allclose(windowed[:, 8:], full[:, 8:])


def test_loss_mask_and_ignore_index():
    config = models.preset("tiny-llama")
    params = models.init(config, random.key(0))
    batch = _batch(config)
    logits = models.apply(config, params, batch["tokens"])
    masked = dict(batch, loss_mask=torch.zeros(2, 12, dtype=torch.bool))
    masked["loss_mask"][0, :4] = True
    expected = torch.nn.functional.cross_entropy(logits[0, :4], batch["targets"][0, :4])
    loss, metrics = models.loss(config, params, masked)
    torch.testing.assert_close(loss, expected)
    assert metrics["valid_tokens"].item() == 4
    ignored = dict(batch, targets=batch["targets"].clone())
    ignored["targets"][:, 4:] = -100
    expected = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, 256), batch["targets"][:, :4].reshape(-1))
    torch.testing.assert_close(models.loss(config, params, ignored)[0], expected)


def test_bfloat16_params_give_bfloat16_logits_close_to_float32():
    config = models.preset("tiny-llama")
    params32 = models.init(config, random.key(0))
    params16 = models.init(config, random.key(0), dtype=torch.bfloat16)
    tokens = _batch(config)["tokens"]
    logits16 = models.apply(config, params16, tokens)
    assert logits16.dtype == torch.bfloat16
    logits32 = models.apply(config, params32, tokens)
    assert (logits16.float() - logits32).abs().max() < 0.05 * logits32.abs().max()
    loss, _ = models.loss(config, params16, _batch(config))
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_func_grad_of_loss_equals_autograd(name):
    config = models.preset(name, n_layers=1)
    params = models.init(config, random.key(0))
    batch = _batch(config, seq=8)

    grads = torch.func.grad(lambda p: models.loss(config, p, batch)[0])(params)

    leaves = {path: t.clone().requires_grad_(True) for path, t in tree.flatten(params).items()}
    models.loss(config, tree.unflatten(leaves), batch)[0].backward()
    flat_grads = tree.flatten(grads)
    assert flat_grads.keys() == leaves.keys()
    for path, leaf in leaves.items():
        torch.testing.assert_close(flat_grads[path], leaf.grad, atol=1e-6, rtol=1e-5, msg=path)
    if config.moe is not None:
        assert flat_grads["layers.0.moe.router"].abs().sum() > 0  # aux loss and weights reach it


def test_missing_batch_key_is_a_clear_error():
    config = models.preset("tiny-llama")
    params = models.init(config, random.key(0))
    with pytest.raises(KeyError, match="targets"):
        models.loss(config, params, {"tokens": torch.zeros(1, 4, dtype=torch.long)})


def test_vmap_over_sequences_equals_batched_apply():
    config = models.preset("tiny-mistral", n_layers=1)  # windowed: the boolean-mask path
    params = models.init(config, random.key(0))
    tokens = torch.randint(0, 256, (3, 10))
    with warnings.catch_warnings():  # CPU SDPA has no batching rule yet: a slow-path warning
        warnings.simplefilter("ignore", UserWarning)
        per_row = torch.func.vmap(lambda row: models.apply(config, params, row[None])[0])(tokens)
    torch.testing.assert_close(per_row, models.apply(config, params, tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-mixtral"])
def test_bfloat16_layernorm_and_moe_families_run_in_bfloat16(name):
    config = models.preset(name)
    params = models.init(config, random.key(0), dtype=torch.bfloat16)
    batch = _batch(config)
    assert models.apply(config, params, batch["tokens"]).dtype == torch.bfloat16
    loss, metrics = models.loss(config, params, batch)
    assert torch.isfinite(loss) and abs(loss.item() - math.log(config.vocab_size)) < 0.7
