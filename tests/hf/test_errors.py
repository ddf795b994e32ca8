"""Refusals: pickles, remote code, unsupported semantics, and tensors that do not match the config."""

import json

import pytest
import torch
from hf_cases import build_hf_model
from safetensors.torch import load_file, save_file

import fastllm.hf
from fastllm.hf import UnsupportedConfig


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "hf"
    build_hf_model("llama").save_pretrained(path)
    return path


def _copy_with_config(src, dst, **changes):
    dst.mkdir()
    raw = json.loads((src / "config.json").read_text())
    raw.update(changes)
    raw = {k: v for k, v in raw.items() if v is not _DROP}
    (dst / "config.json").write_text(json.dumps(raw))
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    return dst


_DROP = object()


def test_pickle_only_directory_is_refused(llama_dir, tmp_path):
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    torch.save(load_file(llama_dir / "model.safetensors"), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin.*requires safetensors"):
        fastllm.hf.load(tmp_path)


def test_remote_code_is_refused(llama_dir, tmp_path):
    path = _copy_with_config(llama_dir, tmp_path / "m", auto_map={"AutoModelForCausalLM": "modeling_x.X"})
    with pytest.raises(ValueError, match="auto_map"):
        fastllm.hf.load(path)


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
])
def test_unsupported_rope_type(llama_dir, tmp_path, rope):
    path = _copy_with_config(llama_dir, tmp_path / "m", rope_parameters=rope)
    with pytest.raises(UnsupportedConfig, match=f"rope_parameters.rope_type = '{rope['rope_type']}'"):
        fastllm.hf.load(path)


def test_legacy_rope_scaling_field_is_read(llama_dir, tmp_path):
    """transformers 4 configs spell it rope_theta + rope_scaling {"type": ...}."""
    raw = json.loads((llama_dir / "config.json").read_text())
    rope = raw["rope_parameters"]
    legacy = {"type": "llama3", **{k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}}
    path = _copy_with_config(llama_dir, tmp_path / "m", rope_parameters=_DROP, rope_theta=rope["rope_theta"],
                             rope_scaling=legacy)
    assert fastllm.hf.load_config(path) == fastllm.hf.load_config(llama_dir)


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "bert"}, "model_type = 'bert'"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({"hidden_act": "gelu_fast"}, "hidden_act = 'gelu_fast'"),
])
def test_unsupported_llama_fields(llama_dir, tmp_path, changes, message):
    with pytest.raises(UnsupportedConfig, match=message):
        fastllm.hf.load(_copy_with_config(llama_dir, tmp_path / "m", **changes))


@pytest.mark.parametrize("case, changes, message", [
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx = True"),
    ("gpt2", {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn = True"),
    ("gpt2", {"scale_attn_weights": False}, "scale_attn_weights = False"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise = 0.1"),
    ("qwen2", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
])
def test_unsupported_family_fields(tmp_path, case, changes, message):
    build_hf_model(case).save_pretrained(tmp_path / "src")
    with pytest.raises(UnsupportedConfig, match=message):
        fastllm.hf.load(_copy_with_config(tmp_path / "src", tmp_path / "m", **changes))


def test_missing_and_unexpected_tensors_are_named(llama_dir, tmp_path):
    tensors = load_file(llama_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    path = _copy_with_config(llama_dir, tmp_path / "m")
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]; "
                                         r"unexpected \['model.layers.0.mlp.extra.weight'\]"):
        fastllm.hf.load(path)


def test_wrong_shape_is_named(llama_dir, tmp_path):
    path = _copy_with_config(llama_dir, tmp_path / "m", intermediate_size=40)
    with pytest.raises(ValueError, match=r"wrong shapes \[.*'layers.0.mlp.w_gate: \(48, 32\) != \(40, 32\)"):
        fastllm.hf.load(path)


def test_tensor_that_cannot_be_split_into_heads_is_named(llama_dir, tmp_path):
    tensors = load_file(llama_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(15, 32)
    path = _copy_with_config(llama_dir, tmp_path / "m")
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight.*\(15, 32\)"):
        fastllm.hf.load(path)


def test_save_refuses_what_the_architecture_cannot_express(llama_dir, tmp_path):
    config, params = fastllm.hf.load(llama_dir)
    with pytest.raises(UnsupportedConfig, match="family = 'custom'"):
        fastllm.hf.save(config.replace(family="custom"), params, tmp_path / "a")
    with pytest.raises(UnsupportedConfig, match="sliding_window"):
        fastllm.hf.save(config.replace(sliding_window=4), params, tmp_path / "b")
    with pytest.raises(UnsupportedConfig, match="qkv_bias"):
        fastllm.hf.save(config.replace(family="qwen2"), params, tmp_path / "c")  # Qwen2 always has q/k/v bias
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        fastllm.hf.save(config, params, tmp_path / "d")
    assert (tmp_path / "d" / "notes.txt").read_text() == "keep me"


def test_save_refuses_a_mixtral_that_drops_tokens(tmp_path):
    """Mixtral is dropless: a capacity factor has no Hugging Face counterpart."""
    from fastllm import models, random
    from fastllm.models import MoEConfig

    config = models.preset("tiny-mixtral", moe=MoEConfig(n_experts=4, top_k=2, capacity_factor=1.25))
    with pytest.raises(UnsupportedConfig, match="moe.capacity_factor = None"):
        fastllm.hf.save(config, models.init(config, random.key(0)), tmp_path / "m")
