"""The Trainer: metrics.jsonl, validation, exact resume, atomic checkpoints, export and sampling."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastllm import tree
from fastllm.config import apply_overrides
from fastllm.data import DataConfig
from fastllm.train import checkpointing
from fastllm.train.config import Config, ModelSection, OptimSection, RunConfig, TrainSection
from fastllm.train.metrics import read_metrics
from fastllm.train.quickstart import prepare_quickstart
from fastllm.train.trainer import Trainer

VOCAB = 320


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("quickstart-data")
    tokens, _ = prepare_quickstart(directory, max_bytes=150_000, vocab_size=VOCAB)
    return str(tokens)


def make_config(run_dir, dataset, **train) -> Config:
    return Config(
        run=RunConfig(dir=str(run_dir), progress="off"),
        model=ModelSection(preset="tiny-llama", vocab_size=VOCAB, n_layers=1),
        data=DataConfig(datasets=(dataset,), seq_len=32, validation_fraction=0.1, prefetch=0),
        train=TrainSection(**{"steps": 6, "batch_size": 2, "micro_batch_size": 2, "log_every": 1, "eval_batches": 2,
                              **train}),
        optim=OptimSection(lr=3e-3, warmup_steps=2),
    )


def losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_metrics_log_validation_and_final_checkpoint(tmp_path, dataset):
    config = make_config(tmp_path, dataset, eval_every=3, batch_size=4)  # two micro-batches of 2 a step
    result = Trainer(config).run()
    records = read_metrics(tmp_path / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    for r in train_records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    assert "mfu" not in train_records[0]  # only on a GPU
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert result.val_loss == records[-1]["val_loss"]
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    assert checkpointing.latest(tmp_path).name == "step-00000006"
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["batch_size"] == 4 and (tmp_path / "tokenizer.json").is_file()


def test_no_final_checkpoint_when_asked(tmp_path, dataset):
    config = make_config(tmp_path, dataset, checkpoint_every=4, checkpoint_minutes=0.0, final_checkpoint=False)
    Trainer(config).run()
    assert checkpointing.latest(tmp_path).name == "step-00000004"  # the periodic one, not step 6


def test_resume_is_bitwise_exact(tmp_path, dataset):
    whole = tmp_path / "whole"
    Trainer(make_config(whole, dataset)).run()
    split = tmp_path / "split"
    first = Trainer(make_config(split, dataset)).run(stop_at=4)
    assert first.state.step == 4
    resumed = Trainer(make_config(split, dataset)).run()
    assert [r["step"] for r in resumed.history if "loss" in r] == [5, 6]  # restored, not trained afresh
    assert losses(split) == losses(whole)  # same floats, bit for bit
    uninterrupted, _ = checkpointing.load(checkpointing.latest(whole), resumed.state)
    for a, b in zip(tree.leaves(resumed.state), tree.leaves(uninterrupted)):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_resume_drops_log_lines_written_after_the_checkpoint(tmp_path, dataset):
    Trainer(make_config(tmp_path, dataset, checkpoint_every=2)).run(stop_at=3)  # saves at 2 and 3
    state_3 = checkpointing.latest(tmp_path)
    os.rename(state_3, state_3.with_name("step-00000003.tmp-12345"))  # as if step 3 never landed
    resumed = Trainer(make_config(tmp_path, dataset, checkpoint_every=2)).run()
    assert [r["step"] for r in resumed.history if "loss" in r] == [3, 4, 5, 6]  # restored step 2
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4, 5, 6]


_KILL_DURING_SAVE = """
import os, sys
import fastllm.sharding.checkpoint as store
real_save = store.save
def dying_save(path, trees, specs, mesh, metadata=None, **options):
    def hook(stage):  # killed mid-checkpoint: tensors written, completion marker not, not renamed
        if stage == "before_complete" and "step-00000004" in str(path):
            os._exit(9)
    return real_save(path, trees, specs, mesh, metadata, _hook=hook, **options)
store.save = dying_save
sys.path.insert(0, {tests!r})
from test_trainer import make_config
from fastllm.train.trainer import Trainer
Trainer(make_config({run!r}, {data!r}, checkpoint_every=2)).run()
"""


def test_killed_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, dataset):
    script = _KILL_DURING_SAVE.format(tests=os.path.dirname(__file__), run=str(tmp_path), data=dataset)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert checkpointing.latest(tmp_path).name == "step-00000002"
    leftovers = list((tmp_path / "checkpoints").glob("step-00000004.tmp-*"))
    assert leftovers and not (tmp_path / "checkpoints" / "step-00000004").exists()
    with pytest.raises(checkpointing.CheckpointError, match="incomplete"):
        checkpointing.load(leftovers[0], Trainer(make_config(tmp_path, dataset)).init_state())
    result = Trainer(make_config(tmp_path, dataset, checkpoint_every=2)).run()  # resumes from step 2
    assert [r["step"] for r in result.history if "loss" in r] == [3, 4, 5, 6]
    assert result.state.step == 6 and not list((tmp_path / "checkpoints").glob("*.tmp-*"))


def test_checkpoint_from_another_config_is_refused(tmp_path, dataset):
    Trainer(make_config(tmp_path, dataset, steps=2)).run()
    before = (tmp_path / "config.json").read_text(), (tmp_path / "metrics.jsonl").read_text()
    wider = apply_overrides(make_config(tmp_path, dataset, steps=4), ["model.embed_dim=32"])
    with pytest.raises(checkpointing.CheckpointError, match="expects shape"):
        Trainer(wider).run()
    assert ((tmp_path / "config.json").read_text(), (tmp_path / "metrics.jsonl").read_text()) == before


def test_multi_process_mesh_is_refused_clearly(tmp_path, dataset):
    config = apply_overrides(make_config(tmp_path, dataset), ["mesh.tensor=2"])
    with pytest.raises(ValueError, match="mesh.tensor=2.*world has 1.*torchrun"):  # partitioner
        Trainer(config)
