"""Logits and gradient parity with transformers for every family, through load and save."""

import pytest
import torch
import transformers
from hf_cases import CASES, build_hf_model, hf_to_ours, tokens

import fastllm.hf
from fastllm import models, tree

FP32_TOL = 1e-4


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(name, HF model, its save_pretrained directory)."""
    model = build_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(path)
    return request.param, model, path


def test_load_matches_transformers(case):
    name, model, path = case
    config, params = fastllm.hf.load(path)
    assert config.family == model.config.model_type.replace("gpt_bigcode", "starcoder")
    ids = tokens()
    ours = models.apply(config, params, ids)
    torch.testing.assert_close(ours, _hf_logits(model, ids), atol=FP32_TOL, rtol=0)


def test_save_loads_in_transformers(case, tmp_path):
    name, model, path = case
    config, params = fastllm.hf.load(path)
    fastllm.hf.save(config, params, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert type(reloaded) is type(model)
    ids = tokens(seed=2)
    torch.testing.assert_close(_hf_logits(reloaded.eval(), ids), models.apply(config, params, ids),
                               atol=FP32_TOL, rtol=0)
    # the written config is the same model: every architectural field agrees with the source's
    again, _ = fastllm.hf.load(tmp_path / "out")
    assert again == config


def test_bfloat16_error_comparable_to_transformers(case):
    """bf16 has ~3 significant digits; ours must be as close to the fp32 logits as transformers'
    own bf16 run is (within 1.5x, plus 0.01 absolute slack for rounding-order luck; measured: both
    about 0.02 on logits of magnitude ~2, ratio 0.9-1.1)."""
    name, model, path = case
    ids = tokens(seed=3)
    reference = _hf_logits(model, ids)
    config, params = fastllm.hf.load(path, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in tree.leaves(params))
    ours = models.apply(config, params, ids).float()
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                                attn_implementation="eager").eval()
    theirs = _hf_logits(hf_bf16, ids).float()
    ours_error = (ours - reference).abs().max().item()
    their_error = (theirs - reference).abs().max().item()
    assert ours_error <= 1.5 * their_error + 0.01, (ours_error, their_error)


def test_gradients_match_transformers(case):
    """d loss / d params of fastllm.models.loss under torch.func.grad == transformers' autograd,
    CE with its internal label shift, plus Mixtral's load-balancing term (output_router_logits)."""
    name, model, path = case
    config, params = fastllm.hf.load(path)
    ids = tokens(seed=4)
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    batch = {"tokens": ids, "targets": targets}

    grads = torch.func.grad(lambda p: models.loss(config, p, batch)[0])(params)

    model.zero_grad()
    extra = {"output_router_logits": True} if config.moe is not None else {}
    model(input_ids=ids, labels=ids, **extra).loss.backward()
    hf_grads = {n: p.grad for n, p in model.named_parameters()}
    expected = hf_to_ours(config, hf_grads)

    ours = tree.flatten(grads)
    assert set(ours) == set(expected)
    for path_name, grad in ours.items():
        torch.testing.assert_close(grad, expected[path_name], atol=1e-5, rtol=1e-4, msg=path_name)


# Each case's distinguishing feature must change the logits well beyond the tolerance above, or the
# parity tests could not catch a converter that ignored it.
FEATURE_OFF = {
    "llama": lambda c: c.replace(rope=c.rope.__class__(theta=c.rope.theta)),  # llama3 scaling off
    "llama_bias": lambda c: c.replace(rope=c.rope.__class__(theta=c.rope.theta)),  # linear scaling off
    "mistral": lambda c: c.replace(sliding_window=None),
    "qwen2": lambda c: c.replace(sliding_window_layers=None),  # window on layer 0 too
    "mixtral": lambda c: c.replace(moe=c.moe.__class__(n_experts=4, top_k=1)),
}


@pytest.mark.parametrize("name", sorted(FEATURE_OFF))
def test_case_features_change_the_logits(name, tmp_path):
    model = build_hf_model(name)
    model.save_pretrained(tmp_path)
    config, params = fastllm.hf.load(tmp_path)
    ids = tokens()
    gap = (models.apply(FEATURE_OFF[name](config), params, ids) - _hf_logits(model, ids)).abs().max().item()
    assert gap > 100 * FP32_TOL
