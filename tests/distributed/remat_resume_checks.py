"""A ZeRO-3 run with block recomputation, stopped and resumed, inside spawned gloo ranks
(see test_trainer_remat_resume.py)."""

from __future__ import annotations

from pathlib import Path

from trainer_checks import losses

from fastllm.config import apply_overrides
from fastllm.train import checkpointing
from fastllm.train.run import train
from fastllm.train.trainer import Trainer


def remat_zero3_resume(config, overrides: list[str]) -> dict:
    """Losses of a whole run (exported to HF) and of a run stopped at step 2 and resumed, with the
    checkpoint the second run found and the step it restored."""
    whole = apply_overrides(config, overrides + [f"run.dir={config.run.dir}/whole", "run.export_hf=true"])
    train(whole, print_fn=lambda *_: None)
    resumed = apply_overrides(config, overrides + [f"run.dir={config.run.dir}/resumed"])
    Trainer(resumed).run(stop_at=2)
    found = checkpointing.latest(resumed.run.dir)
    restored = Trainer(resumed).restore()
    result = train(resumed, print_fn=lambda *_: None)
    return {"whole": losses(Path(whole.run.dir)), "resumed": losses(Path(resumed.run.dir)),
            "found": found.name, "restored_step": restored.step,
            "trained": [r["step"] for r in result.history if "loss" in r]}
