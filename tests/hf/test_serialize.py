"""fastllm's own checkpoint format: config dicts, atomic directory writes, shape checks."""

import json

import pytest
import torch

from fastllm import models, random, tree
from fastllm.config import ConfigError
from fastllm.models import serialize
from fastllm.models.config import ModelConfig, MoEConfig, RopeConfig

CONFIG = ModelConfig(vocab_size=64, embed_dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48,
                     rope=RopeConfig(theta=500.0, scaling="llama3", factor=4.0, original_max_positions=32),
                     moe=MoEConfig(n_experts=4, top_k=2), sliding_window=8, sliding_window_layers=1,
                     family="mixtral")


def test_config_dict_round_trip():
    data = serialize.config_to_dict(CONFIG)
    assert json.loads(json.dumps(data)) == data
    assert data["rope"]["scaling"] == "llama3" and data["moe"]["top_k"] == 2
    assert serialize.config_from_dict(data) == CONFIG


@pytest.mark.parametrize("change, key", [
    ({"n_layerz": 2}, "n_layerz"),
    ({"n_layers": "2"}, "n_layers"),
    ({"tie_embeddings": 1}, "tie_embeddings"),
    ({"norm": "batchnorm"}, "norm"),
    ({"rope": {"theta": "big"}}, "rope.theta"),
    ({"moe": {"n_experts": 4, "topk": 2}}, "moe.topk"),
])
def test_config_from_dict_names_the_bad_field(change, key):
    data = serialize.config_to_dict(CONFIG) | change
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        serialize.config_from_dict(data)


def test_save_and_load_model(tmp_path):
    params = models.init(CONFIG, random.key(0))
    serialize.save_model(CONFIG, params, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging left behind
    header = json.loads((tmp_path / "ckpt" / "fastllm.json").read_text())
    assert header == {"format": "fastllm-model", "version": 1, "config": serialize.config_to_dict(CONFIG)}
    config, loaded = serialize.load_model(tmp_path / "ckpt")
    assert config == CONFIG
    assert isinstance(loaded["layers"], list)
    flat, expected = tree.flatten(loaded), tree.flatten(params)
    assert flat.keys() == expected.keys() and all(torch.equal(flat[k], expected[k]) for k in flat)
    _, bf16 = serialize.load_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert {t.dtype for t in tree.leaves(bf16)} == {torch.bfloat16}


def test_interrupted_save_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    params = models.init(CONFIG, random.key(0))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(serialize.json, "dump", crash)  # dies after the weights, before fastllm.json
    with pytest.raises(KeyboardInterrupt):
        serialize.save_model(CONFIG, params, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_a_model_but_not_other_data(tmp_path):
    serialize.save_model(CONFIG, models.init(CONFIG, random.key(0)), tmp_path / "ckpt")
    newer = models.init(CONFIG, random.key(1))
    serialize.save_model(CONFIG, newer, tmp_path / "ckpt")
    assert torch.equal(serialize.load_model(tmp_path / "ckpt")[1]["embed"]["tokens"], newer["embed"]["tokens"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError):
        serialize.save_model(CONFIG, newer, tmp_path / "data")


def test_params_that_do_not_fit_the_config_are_refused(tmp_path):
    params = models.init(CONFIG, random.key(0))
    with pytest.raises(ValueError, match=r"missing \['lm_head.w'\]"):
        serialize.save_model(CONFIG.replace(tie_embeddings=False), {**params, "lm_head": {}}, tmp_path / "a")
    with pytest.raises(ValueError, match="wrong shapes.*embed.tokens"):
        serialize.save_model(CONFIG.replace(vocab_size=65), params, tmp_path / "b")
    serialize.save_model(CONFIG, params, tmp_path / "c")
    header = json.loads((tmp_path / "c" / "fastllm.json").read_text())
    header["config"]["mlp_dim"] = 40
    (tmp_path / "c" / "fastllm.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="wrong shapes"):
        serialize.load_model(tmp_path / "c")
    header["format"] = "other"
    (tmp_path / "c" / "fastllm.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="format"):
        serialize.load_model(tmp_path / "c")
