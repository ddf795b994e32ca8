"""The cookbook, followed end to end on CPU (docs/cookbook.md): a Hugging Face checkpoint made with
transformers' own config classes is converted and its training continued; the result is
fine-tuned with loss masks; the continued pre-training runs again as a 4-process layout launched
as two torchrun "nodes" on localhost; the runs are plotted."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastllm import cli, hf, models
from fastllm.config import load_recipe
from fastllm.nn.loss import IGNORE_INDEX, cross_entropy
from fastllm.train.data import build_loaders
from fastllm.train.metrics import read_metrics
from fastllm.train.quickstart import EOS, prepare_quickstart

ROOT = Path(__file__).parents[2]
VOCAB = 320
SHORT = ["data.seq_len=32", "train.batch_size=4", "train.steps=6", "train.log_every=1", "train.eval_every=0",
         "train.checkpoint_every=0", "optim.warmup_steps=1", "data.validation_fraction=0.1", "run.progress=off"]


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    root = tmp_path_factory.mktemp("cookbook")
    tokens, tokenizer = prepare_quickstart(root / "data", max_bytes=120_000, vocab_size=VOCAB)
    return SimpleNamespace(root=root, tokens=tokens, tokenizer=tokenizer)


def _hf_checkpoint(directory: Path, tokenizer: Path) -> Path:
    """A Llama checkpoint written by transformers itself, with our tokenizer beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(directory)
    shutil.copyfile(tokenizer, directory / "tokenizer.json")
    return directory


def _first_loss(recipe_path: Path, overrides: list[str], weights: Path) -> float:
    """The loss of the run's first batch under ``weights``: what step 1 logs when it starts there."""
    recipe, config = load_recipe(recipe_path, overrides)
    config = recipe.before_train(config)
    train, _ = build_loaders(config, micro_batch_size=config.train.batch_size)
    batch = next(train)
    loaded = hf.load_any(weights, dtype=torch.float32)
    logits = models.apply(loaded.config, loaded.params, batch["tokens"], segment_ids=batch["segment_ids"])
    return cross_entropy(logits, batch["targets"])[0].item()


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(overrides: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """``torchrun`` twice, as two nodes of 2 processes meeting at one rendezvous endpoint."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTLLM_TYPECHECK": "0"}
    nodes = []
    for node in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "cookbook",
                   "--rdzv-conf", f"is_host={'true' if node == 0 else 'false'}", "-m", "fastllm", "train",
                   str(ROOT / "recipes" / "continued_pretraining.py"), *overrides]
        nodes.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [node.communicate(timeout=420)[0] for node in nodes]
    return [subprocess.CompletedProcess(n.args, n.returncode, out) for n, out in zip(nodes, outputs)]


@pytest.mark.slow
def test_cookbook(book, tmp_path, capsys):
    hf_dir = _hf_checkpoint(tmp_path / "hf-base", book.tokenizer)
    assert cli.main(["convert", str(hf_dir), str(tmp_path / "base"), "--to", "fastllm"]) == 0

    # continued pre-training from the converted checkpoint: step 1 starts at its weights exactly
    continued = tmp_path / "runs" / "continued"
    recipe = ROOT / "recipes" / "continued_pretraining.py"
    overrides = [f"run.init_from={tmp_path / 'base'}", f"data.datasets={book.tokens}", f"run.dir={continued}", *SHORT]
    assert cli.main(["train", str(recipe), *overrides]) == 0
    assert "with the weights of" in capsys.readouterr().out
    assert _losses(continued)[0] == pytest.approx(_first_loss(recipe, overrides, hf_dir), rel=1e-4)
    assert (continued / "hf" / "config.json").is_file()

    # supervised fine-tuning with loss masks, from the continued run's export
    pairs = [{"prompt": f"# question {i}: what is {i} + {i}?\n", "response": f"answer = {2 * i}\n"} for i in range(80)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    sft_data = tmp_path / "data" / "sft"
    assert cli.main(["prepare", str(tmp_path / "sft.jsonl"), "--tokenizer", str(book.tokenizer), "--output",
                     str(sft_data), "--prompt-field", "prompt", "--response-field", "response", "--eos-token", EOS,
                     "--quiet", "--workers", "1"]) == 0
    sft = tmp_path / "runs" / "sft"
    sft_overrides = [f"run.init_from={continued / 'hf'}", f"data.datasets={sft_data}", f"run.dir={sft}", *SHORT]
    assert cli.main(["train", str(ROOT / "recipes" / "sft.py"), *sft_overrides]) == 0
    sft_recipe, sft_config = load_recipe(ROOT / "recipes" / "sft.py", sft_overrides)
    batch = next(build_loaders(sft_recipe.before_train(sft_config), micro_batch_size=4)[0])
    scored = int((batch["targets"] != IGNORE_INDEX).sum())
    first = [r for r in read_metrics(sft / "metrics.jsonl") if "loss" in r][0]
    assert first["tokens"] == scored < 0.6 * batch["targets"].numel()  # prompts and crossings are not targets

    # the same continued pre-training on data=2 x tensor=2, launched as two nodes of two processes
    mesh_run = tmp_path / "runs" / "mesh"
    mesh_overrides = [*overrides[:2], f"run.dir={mesh_run}", *SHORT, "mesh.data=2", "mesh.tensor=2",
                      "run.export_hf=false"]
    done = _two_nodes(mesh_overrides, tmp_path)
    assert [d.returncode for d in done] == [0, 0], done[0].stdout[-3000:] + done[1].stdout[-3000:]
    printed = done[0].stdout + done[1].stdout
    assert printed.count("fastllm: ") == 1 and "data=2 x tensor=2 x pipe=1 (4 processes)" in printed  # rank 0 only
    assert printed.count("step 6/6  loss") == 1
    assert _losses(mesh_run) == pytest.approx(_losses(continued), rel=1e-4)  # the layout changes nothing

    # and the three runs plotted together
    out = tmp_path / "curves.png"
    assert cli.main(["plot", str(continued), str(sft), str(mesh_run), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
