"""Sharded checkpoints, the tokenizer, and conversion between HF and fastllm formats (API and CLI)."""

import argparse
import json

import pytest
import torch
import transformers
from hf_cases import VOCAB, build_hf_model, tokens
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

import fastllm.hf
from fastllm import models, tree
from fastllm.hf import cli
from fastllm.models import serialize


def _flat_equal(a, b):
    fa, fb = tree.flatten(a), tree.flatten(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        assert torch.equal(fa[name], fb[name]), name


def _tokenizer() -> Tokenizer:
    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral") / "hf"
    build_hf_model("mixtral").save_pretrained(path)
    return path


def test_sharded_checkpoint_from_transformers_loads(mixtral_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(mixtral_dir)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    _flat_equal(fastllm.hf.load(tmp_path)[1], fastllm.hf.load(mixtral_dir)[1])


def test_save_sharded_loads_in_transformers_and_back(mixtral_dir, tmp_path):
    config, params = fastllm.hf.load(mixtral_dir)
    fastllm.hf.save(config, params, tmp_path / "out", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((tmp_path / "out" / s).is_file() for s in shards)
    assert "lm_head.weight" in index["weight_map"]  # untied here
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, models.apply(config, params, ids),
                                   atol=1e-4, rtol=0)
    _flat_equal(fastllm.hf.load(tmp_path / "out")[1], params)


def test_tied_head_is_not_stored(tmp_path):
    build_hf_model("qwen2").save_pretrained(tmp_path / "src")
    config, params = fastllm.hf.load(tmp_path / "src")
    assert config.tie_embeddings and "lm_head" not in params
    fastllm.hf.save(config, params, tmp_path / "out")
    from safetensors import safe_open
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()


@pytest.mark.parametrize("form", ["object", "file", "directory"])
def test_tokenizer_written_for_auto_tokenizer(mixtral_dir, tmp_path, form):
    tok = _tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    source = {"object": tok, "file": tmp_path / "tokenizer.json", "directory": tmp_path}[form]
    config, params = fastllm.hf.load(mixtral_dir)
    fastllm.hf.save(config, params, tmp_path / "out", tokenizer=source)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "w1 w5 w42 nope"
    assert loaded(text)["input_ids"] == tok.encode(text).ids == [1, 5, 42, VOCAB - 1]


def test_convert_round_trip_both_ways(mixtral_dir, tmp_path):
    _tokenizer().save(str(mixtral_dir / "tokenizer.json"))
    config, params = fastllm.hf.load(mixtral_dir)

    assert fastllm.hf.convert(mixtral_dir, tmp_path / "ours") == "fastllm"
    header = json.loads((tmp_path / "ours" / "fastllm.json").read_text())
    assert header["format"] == "fastllm-model" and header["version"] == 1
    assert (tmp_path / "ours" / "tokenizer.json").is_file()
    ours_config, ours_params = serialize.load_model(tmp_path / "ours")
    assert ours_config == config
    _flat_equal(ours_params, params)

    assert fastllm.hf.convert(tmp_path / "ours", tmp_path / "back") == "hf"
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    back_config, back_params = fastllm.hf.load(tmp_path / "back")
    assert back_config == config
    _flat_equal(back_params, params)


def test_cli_convert_with_dtype(mixtral_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="fastllm")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", str(mixtral_dir), str(tmp_path / "bf16"), "--to", "fastllm",
                              "--dtype", "bfloat16"])
    assert args.run(args) == 0
    assert "fastllm" in capsys.readouterr().out
    _, params = serialize.load_model(tmp_path / "bf16")
    assert {t.dtype for t in tree.leaves(params)} == {torch.bfloat16}
    args = parser.parse_args(["convert", str(tmp_path / "bf16"), str(tmp_path / "hf16")])
    args.run(args)
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf16")
    assert next(reloaded.parameters()).dtype == torch.bfloat16


def test_fused_mixtral_state_dict_loads(mixtral_dir, tmp_path):
    """transformers 5 keeps experts fused in memory (mlp.experts.gate_up_proj); files may carry that too."""
    model = transformers.AutoModelForCausalLM.from_pretrained(mixtral_dir)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    (tmp_path / "config.json").write_text((mixtral_dir / "config.json").read_text())
    save_file(state, tmp_path / "model.safetensors")
    _flat_equal(fastllm.hf.load(tmp_path)[1], fastllm.hf.load(mixtral_dir)[1])


def test_original_gpt2_layout_loads(tmp_path):
    """The hub's gpt2 files name weights without 'transformer.' and carry causal-mask buffers."""
    build_hf_model("gpt2").save_pretrained(tmp_path / "src")
    state = load_file(tmp_path / "src" / "model.safetensors")
    bare = {k.removeprefix("transformer."): v for k, v in state.items()}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    save_file(bare, tmp_path / "bare" / "model.safetensors")
    _flat_equal(fastllm.hf.load(tmp_path / "bare")[1], fastllm.hf.load(tmp_path / "src")[1])


def test_written_config_also_carries_transformers4_fields(tmp_path):
    build_hf_model("llama").save_pretrained(tmp_path / "src")
    config, params = fastllm.hf.load(tmp_path / "src")
    fastllm.hf.save(config, params, tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["model_type"] == "llama"
    assert raw["dtype"] == raw["torch_dtype"] == "float32"
    assert raw["rope_scaling"]["type"] == raw["rope_parameters"]["rope_type"] == "llama3"
    assert raw["rope_theta"] == raw["rope_parameters"]["rope_theta"]
    assert (tmp_path / "out" / "generation_config.json").is_file()
