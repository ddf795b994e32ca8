"""The command line: train (recipe + overrides), generate, and the shortened quickstart end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastllm import cli
from fastllm.config import load_recipe
from fastllm.train.metrics import read_metrics
from fastllm.train.run import train

ROOT = Path(__file__).parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.py"


def test_print_config_applies_overrides(capsys):
    assert cli.main(["train", str(QUICKSTART), "--print-config", "train.steps=3", "optim.warmup_steps=1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["steps"] == 3 and printed["model"]["preset"] == "tiny-llama"


def test_bad_override_exits_with_a_message_naming_the_key(capsys):
    assert cli.main(["train", str(QUICKSTART), "train.micro_batch_size=-1"]) == 2
    assert "train.micro_batch_size" in capsys.readouterr().err
    assert cli.main(["train", str(QUICKSTART), "nosuch.key=1"]) == 2
    assert "unknown config key 'nosuch'" in capsys.readouterr().err


def test_python_dash_m_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "fastllm", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("train", "generate", "prepare", "convert"):
        assert command in out


def test_shortened_quickstart_learns_exports_and_samples(tmp_path, capsys):
    recipe, config = load_recipe(QUICKSTART, [
        f"run.dir={tmp_path}", "train.steps=80", "optim.warmup_steps=10", "train.eval_every=0",
        "train.checkpoint_every=40", "train.log_every=1", "model.vocab_size=512", "sample.max_new_tokens=12",
    ])
    recipe.CORPUS_BYTES = 300_000  # a tenth of the full corpus
    result = train(config, recipe=recipe)  # after_train raises unless validation loss < unigram entropy
    out = capsys.readouterr().out
    assert "unigram entropy of the data" in out and "--- sample ---" in out
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert (tmp_path / "hf" / "config.json").is_file() and result.state.step == 80
    for source in (tmp_path, tmp_path / "hf"):  # a run directory and the Hugging Face export
        assert cli.main(["generate", str(source), "--prompt", "import os", "--max-new-tokens", "5"]) == 0
        assert capsys.readouterr().out.startswith("import os")
    assert cli.main(["generate", str(tmp_path), "--prompt", "x", "--temperature", "0.8", "--top-k", "20",
                     "--top-p", "0.9", "--max-new-tokens", "5"]) == 0
