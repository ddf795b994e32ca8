"""What a run reports: the start-up block, plain lines off a terminal and a live display on one,
metrics.jsonl with memory, TensorBoard scalars read back, a W&B offline run, a profiler trace."""

from __future__ import annotations

import io
import json

import pytest

from fastllm import models
from fastllm.config import apply_overrides
from fastllm.data import DataConfig
from fastllm.train.config import Config, ModelSection, OptimSection, RunConfig, TrainSection
from fastllm.train.console import Console
from fastllm.train.metrics import read_metrics
from fastllm.train.quickstart import prepare_quickstart
from fastllm.train.trainer import Trainer

VOCAB = 320


def make_config(run_dir, dataset, **train) -> Config:
    return Config(
        run=RunConfig(dir=str(run_dir), progress="off"),
        model=ModelSection(preset="tiny-llama", vocab_size=VOCAB, n_layers=1),
        data=DataConfig(datasets=(dataset,), seq_len=32, validation_fraction=0.1, prefetch=0),
        train=TrainSection(**{"steps": 6, "batch_size": 2, "log_every": 1, "eval_batches": 2, **train}),
        optim=OptimSection(lr=3e-3, warmup_steps=2),
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tokens, _ = prepare_quickstart(tmp_path_factory.mktemp("data"), max_bytes=150_000, vocab_size=VOCAB)
    return str(tokens)


def test_startup_block_plain_lines_and_resume(tmp_path, dataset, capsys):
    config = apply_overrides(make_config(tmp_path, dataset, steps=4, log_every=2, checkpoint_every=2),
                             ["run.progress=auto"])
    Trainer(config).run()
    out = capsys.readouterr().out
    params = models.param_count(config.model_config)
    assert f"{params:,} parameters" in out
    assert "data=1 x tensor=1 x pipe=1 (1 process) on cpu, ZeRO stage 0, fp32" in out
    assert "2 sequences x 32 tokens = 64 tokens per step" in out
    assert f"run dir     {tmp_path}" in out and f"{tmp_path / 'checkpoints'} (every 2 steps" in out
    assert f"{tmp_path / 'metrics.jsonl'} (every 2 steps)" in out and "starts from step 0" in out
    lines = [line for line in out.splitlines() if line.startswith("step ") and "/4" in line]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]  # every log_every steps, not a bar
    assert "tok/s" in lines[0] and "mem " in lines[0] and "eta " in lines[0]
    Trainer(apply_overrides(config, ["train.steps=6"])).run()
    assert "resumes from step 4" in capsys.readouterr().out


def test_console_live_display_and_plain_lines():
    record = {"step": 3, "loss": 4.25, "tokens_per_s": 1234.0, "memory_gib": 0.5}
    live, plain, silent = io.StringIO(), io.StringIO(), io.StringIO()
    for stream, mode, enabled in ((live, "on", True), (plain, "auto", True), (silent, "on", False)):
        console = Console(10, 0, mode=mode, enabled=enabled, stream=stream)
        console.say("hello")
        console.update(record)
        console.close()
    assert "━" in live.getvalue() and "loss 4.2500" in live.getvalue() and "3/10" in live.getvalue()
    assert plain.getvalue().splitlines()[1].startswith("step 3/10  loss 4.2500  1,234 tok/s  mem 0.50 GiB  eta")
    assert silent.getvalue() == ""  # another rank


def test_tensorboard_wandb_offline_and_profiler(tmp_path, dataset, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = apply_overrides(make_config(tmp_path, dataset, steps=4), [
        "log.tensorboard=true", "log.wandb_project=fastllm-test", "log.wandb_mode=offline", "log.profile_steps=2,3"])
    Trainer(config).run()
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert all(r["memory_gib"] > 0 for r in records)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for name in ("loss", "lr", "grad_norm", "tokens_per_s", "memory_gib"):
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        assert logged == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in records], name

    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert (tmp_path / "wandb_id").read_text() in run.name  # a resumed run would continue this W&B run
    (stored,) = run.glob("run-*.wandb")  # the run's records, which `wandb sync` uploads
    data = stored.read_bytes()
    for r in records:  # each history value is stored as its JSON text
        assert json.dumps(r["loss"]).encode() in data and json.dumps(r["grad_norm"]).encode() in data

    trace = json.loads((tmp_path / "profile" / "steps-2-3.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert "aten::mm" in names or "aten::addmm" in names
