"""``convert`` and ``generate`` read every format fastllm writes, through one ``load_any``; the
Hugging Face export carries the tokenizer's bos/eos."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer

from fastllm import cli, hf, tree
from fastllm.errors import UserError
from fastllm.train import checkpointing


def _sources(world) -> dict:
    return {"run": world.run, "training": world.one_process, "sharded": world.sharded,
            "fastllm": world.fastllm_dir, "hf": world.hf_dir}


def _equal(a, b) -> bool:
    fa, fb = tree.flatten(a), tree.flatten(b)
    return fa.keys() == fb.keys() and all(torch.equal(fa[k].float(), fb[k].float()) for k in fa)


def test_each_format_is_detected_and_loads_the_same_model(world):
    _, reference, _ = checkpointing.load_model(world.run)
    for kind, path in _sources(world).items():
        assert hf.detect(path) == kind
        loaded = hf.load_any(path)
        assert loaded.format == kind and loaded.config.vocab_size == 64
        assert _equal(loaded.params, reference), kind
        assert loaded.tokenizer is not None and loaded.tokenizer.is_file(), kind


@pytest.mark.parametrize("to", ["hf", "fastllm"])
def test_convert_reads_every_format(world, tmp_path, to):
    _, reference, _ = checkpointing.load_model(world.run)
    for kind, path in _sources(world).items():
        out = tmp_path / f"{kind}-to-{to}"
        assert hf.convert(path, out, to=to) == to
        back = hf.load_any(out)
        assert back.format == to and _equal(back.params, reference), kind
        assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".*.tmp")), kind


def test_generate_reads_every_format_with_the_same_result(world, capsys):
    texts = {}
    for kind, path in _sources(world).items():
        assert cli.main(["generate", str(path), "--prompt", "w3 w4", "--max-new-tokens", "5"]) == 0, kind
        texts[kind] = capsys.readouterr().out
    assert len(set(texts.values())) == 1 and texts["run"].startswith("w3 w4"), texts


def test_hf_export_carries_eos_and_bos(world, tmp_path):
    eos = Tokenizer.from_file(str(world.tokenizer)).token_to_id("[EOS]")
    config = json.loads((world.hf_dir / "config.json").read_text())
    generation = json.loads((world.hf_dir / "generation_config.json").read_text())
    tokenizer_config = json.loads((world.hf_dir / "tokenizer_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == eos
    assert tokenizer_config["eos_token"] == "[EOS]"
    import transformers

    assert transformers.AutoTokenizer.from_pretrained(world.hf_dir).eos_token_id == eos

    with_bos = Tokenizer.from_file(str(world.tokenizer))  # a tokenizer that defines a BOS too
    with_bos.add_special_tokens(["<s>"])
    loaded = hf.load_any(world.run)
    hf.save(loaded.config, loaded.params, tmp_path / "bos", tokenizer=with_bos)
    config = json.loads((tmp_path / "bos" / "config.json").read_text())
    assert config["bos_token_id"] == with_bos.token_to_id("<s>") and config["eos_token_id"] == eos
    assert json.loads((tmp_path / "bos" / "tokenizer_config.json").read_text())["bos_token"] == "<s>"


def test_train_export_uses_the_eos_of_the_training_data(world, tmp_path):
    """run.export_hf: the EOS the manifest recorded wins over the tokenizer's first EOS-like name."""
    from fastllm.config import load_recipe
    from fastllm.data import prepare
    from fastllm.train.run import export_hf

    data = tmp_path / "data"
    prepare([world.corpus], world.tokenizer, data, eos_token="w7", workers=1, progress=False)
    _, config = load_recipe(world.recipe, [f"run.dir={tmp_path / 'run'}", f"data.datasets={data}"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tokenizer.json").write_bytes(world.tokenizer.read_bytes())
    target = export_hf(config, hf.load_any(world.run).params)
    assert json.loads((target / "tokenizer_config.json").read_text())["eos_token"] == "w7"
    w7 = Tokenizer.from_file(str(world.tokenizer)).token_to_id("w7")
    assert json.loads((target / "config.json").read_text())["eos_token_id"] == w7


def test_convert_refuses_a_tokenizer_of_another_model(world, tmp_path):
    loaded = hf.load_any(world.run)
    with pytest.raises(UserError, match="do not fit the model's vocab_size=64"):
        hf.save(loaded.config, loaded.params, tmp_path / "x", tokenizer=str(world.big_tokenizer))
    assert not (tmp_path / "x").exists()
