"""Per-path scaling, state axes, loss scaling, tree helpers, and capture under torch.compile."""

import jaxtyping
import pytest
import torch
import torch._dynamo.testing

from fastllm import optim, tree


def small_params():
    return {"embed": {"tokens": torch.ones(5, 3)}, "layers": [{"w": torch.ones(3, 3)}],
            "norm": {"scale": torch.ones(3)}}


def test_scale_by_path_first_match_wins_and_rejects_typos():
    transform = optim.scale_by_path({"embed.*": 0.1, "layers.*": 3.0, "*": 0.5})
    params = small_params()
    out, _ = transform.update(params, transform.init(params))
    assert out["embed"]["tokens"].max() == pytest.approx(0.1)
    assert out["layers"][0]["w"].max() == pytest.approx(3.0)
    assert out["norm"]["scale"].max() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="'layer.*' matches no parameter"):
        optim.scale_by_path({"layer.*": 2.0}).init(params)


def test_embeddings_decay_only_when_asked():
    table = torch.ones(5, 3)
    assert not optim.default_decay_mask("embed.tokens", table)
    assert optim.decay_mask(embeddings=True)("embed.tokens", table)
    assert optim.default_decay_mask("unembed", table)
    assert not optim.default_decay_mask("layers.0.ln_1.weight", table)
    decay = optim.add_decayed_weights(0.5)
    params = small_params()
    out, _ = decay.update(tree.map(torch.zeros_like, params), decay.init(params), params)
    assert out["layers"][0]["w"].max() == 0.5 and out["embed"]["tokens"].max() == 0


def test_state_axes_follow_the_params():
    params = small_params()
    axes = {"embed": {"tokens": ("vocab", "embed")}, "layers": [{"w": ("embed", "mlp")}],
            "norm": {"scale": ("embed",)}}
    state = optim.adamw(1e-3, max_grad_norm=1.0).init(params)
    state_axes = optim.state_axes(state, axes)
    adam = optim.get_state(state_axes, optim.ScaleByAdamState)
    assert adam.mu == axes and adam.nu == axes and adam.count == ()
    assert optim.get_state(state_axes, optim.ClipByGlobalNormState).norm == ()


def test_loss_scale_backs_off_on_overflow_and_grows_after_interval():
    state = optim.dynamic_loss_scale(initial=8.0, growth_interval=2)
    grads = {"w": torch.full((2,), 16.0, dtype=torch.float16)}
    unscaled, finite, state = optim.unscale_and_check(grads, state)
    assert bool(finite) and unscaled["w"].dtype == torch.float32
    assert unscaled["w"].tolist() == [2.0, 2.0] and state.scale.item() == 8.0
    _, finite, state = optim.unscale_and_check(grads, state)
    assert state.scale.item() == 16.0 and state.good_steps.item() == 0  # grew after 2 good steps
    bad = {"w": torch.tensor([float("inf"), 1.0], dtype=torch.float16)}
    _, finite, state = optim.unscale_and_check(bad, state)
    assert not bool(finite) and state.scale.item() == 8.0
    assert optim.scale_loss(torch.tensor(1.5), state).item() == 12.0


def test_overflow_step_is_skipped_with_select_tree():
    params = {"w": torch.ones(3)}
    opt = optim.adamw(0.1, weight_decay=0.0)
    opt_state = opt.init(params)
    grads, finite, _ = optim.unscale_and_check({"w": torch.tensor([1.0, float("nan"), 1.0])},
                                               optim.dynamic_loss_scale(initial=1.0))
    updates, new_state = opt.update(grads, opt_state, params)
    kept = optim.select_tree(finite, (optim.apply_updates(params, updates), new_state),
                             (params, opt_state))
    assert torch.equal(kept[0]["w"], params["w"])
    assert optim.get_state(kept[1], optim.ScaleByAdamState).count.item() == 0


def test_cast_tree_only_touches_floats():
    values = {"w": torch.ones(2), "ids": torch.arange(2), "step": 3}
    cast = optim.cast_tree(values, torch.bfloat16)
    assert cast["w"].dtype == torch.bfloat16 and cast["ids"].dtype == torch.int64
    assert cast["step"] == 3


def test_update_compiles_once_without_graph_breaks(monkeypatch):
    # Training runs without the runtime shape checker, whose checks dynamo cannot trace: turn its
    # wrappers into pass-throughs for this test.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    params = small_params()
    opt = optim.adamw(optim.schedules.cosine(1e-2, total_steps=100, warmup_steps=5),
                      weight_decay=0.1, max_grad_norm=1.0)
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)  # fullgraph: a host sync would break the graph
    def step(params, grads, state):
        updates, state = opt.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    state = eager_state = opt.init(params)
    eager_params = params
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        grads = tree.map(lambda p: torch.randn(p.shape, generator=gen), params)
        params, state = step(params, grads, state)
        updates, eager_state = opt.update(grads, eager_state, eager_params)
        eager_params = optim.apply_updates(eager_params, updates)
    assert counter.frame_count == 1  # the step count is data: no recompilation per step
    for a, b in zip(tree.leaves(params), tree.leaves(eager_params)):  # masks see real paths
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-mixtral"])
def test_default_mask_on_the_real_parameter_trees(preset):
    from fastllm.models import decoder, presets
    from fastllm.nn import param

    specs = decoder.param_specs(presets.preset(preset))
    shapes = tree.map(lambda s: torch.empty(s.shape, device="meta"), specs, is_leaf=param.is_param)
    decayed = {path for path, leaf in tree.leaves_with_path(shapes)
               if optim.default_decay_mask(path, leaf)}
    for path, leaf in tree.leaves_with_path(shapes):
        name = path.split(".")[-1]
        is_matrix_weight = leaf.ndim >= 2 and (name.startswith("w") or name == "router")
        assert (path in decayed) == (is_matrix_weight and not path.startswith("embed")), path
    assert ("lm_head.w" in decayed) == (preset == "tiny-mixtral")  # gpt2 ties the head to embed


def test_bf16_gradients_use_fp32_moments():
    params = {"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(0))}
    grads = {"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)}
    opt = optim.adamw(1e-2, mask=optim.decay_all)
    from_bf16, state = opt.update(grads, opt.init(params), params)
    from_fp32, _ = opt.update(optim.cast_tree(grads, torch.float32), opt.init(params), params)
    assert optim.get_state(state, optim.ScaleByAdamState).mu["w"].dtype == torch.float32
    assert from_bf16["w"].dtype == torch.float32
    torch.testing.assert_close(from_bf16["w"], from_fp32["w"], rtol=0, atol=0)
    bf16_params = optim.cast_tree(params, torch.bfloat16)
    assert optim.apply_updates(bf16_params, from_bf16)["w"].dtype == torch.bfloat16
