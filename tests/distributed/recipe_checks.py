"""Train a recipe file through the Trainer inside spawned gloo ranks (see test_custom_recipe.py)."""

from __future__ import annotations

from pathlib import Path

from fastllm.config import load_recipe
from fastllm.train.metrics import read_metrics
from fastllm.train.trainer import Trainer


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]


def train_recipe(path: str, overrides: list[str]) -> list[float]:
    """The logged losses of ``path`` (a recipe with its own ``model(config)``) under ``overrides``."""
    recipe, config = load_recipe(path, overrides)
    Trainer(config, model=recipe.model(config)).run()
    return losses(config.run.dir)
