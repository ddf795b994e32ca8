"""The Trainer on a mesh, inside spawned gloo ranks (see test_trainer_mesh.py)."""

from __future__ import annotations

from pathlib import Path

from fastllm.config import apply_overrides
from fastllm.train.metrics import read_metrics
from fastllm.train.trainer import Trainer


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def train(config, overrides: list[str], stop_at=None) -> list[float]:
    config = apply_overrides(config, overrides)
    Trainer(config).run(stop_at=stop_at)
    return losses(Path(config.run.dir)) if (Path(config.run.dir) / "metrics.jsonl").exists() else []


def resume(config, overrides: list[str]) -> tuple[list[float], list[int]]:
    """(the losses of the run's whole log, the steps this run trained: those after its checkpoint)."""
    config = apply_overrides(config, overrides)
    result = Trainer(config).run()
    return losses(Path(config.run.dir)), [r["step"] for r in result.history if "loss" in r]


def interrupted_and_resumed(config, overrides: list[str]) -> tuple[list[float], list[float], list[int]]:
    """(losses of an uninterrupted run, losses of a run stopped after step 2 and resumed, the steps
    the resumed run trained: those after the checkpoint it restored)."""
    whole = train(config, overrides + [f"run.dir={config.run.dir}/whole"])
    train(config, overrides + [f"run.dir={config.run.dir}/resumed"], stop_at=2)
    result = Trainer(apply_overrides(config, overrides + [f"run.dir={config.run.dir}/resumed"])).run()
    resumed = losses(Path(config.run.dir) / "resumed")
    return whole, resumed, [r["step"] for r in result.history if "loss" in r]
