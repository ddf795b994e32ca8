"""Lifecycle checks run inside spawned gloo ranks (see test_lifecycle_mesh.py)."""

from __future__ import annotations

import dataclasses
import time
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

from fastllm import models, tree
from fastllm.train.lifecycle import PeerFailure, Session
from fastllm.train.trainer import Trainer


def _nan_on_rank(model, rank: int, step: int):
    """``model`` whose loss is NaN on ``rank`` at training step ``step``: before backward, so the
    NaN reaches the other ranks only through the gradient all-reduce and the loss sum."""
    head, calls = model.parts[-1], [0]

    def head_fn(static, params, carry, batch, layout):
        out = head.fn(static, params, carry, batch, layout)
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == step and dist.get_rank() == rank:
                out = {**out, "loss": out["loss"] * float("nan")}
        return out

    return dataclasses.replace(model, parts=[*model.parts[:-1], dataclasses.replace(head, fn=head_fn)])


def nan_on_one_rank(config) -> dict:
    """Train with a NaN loss on rank 1 at step 2; what each rank skipped and ended with."""
    trainer = Trainer(config, model=_nan_on_rank(models.model(config.model_config), rank=1, step=2))
    seen = {}
    step = trainer.train_step

    def recording(state, batch):
        new, metrics = step(state, batch)
        seen[new.step] = [t.clone() for t in tree.leaves(new.params)]
        return new, metrics

    trainer.train_step = recording
    trainer.train_step.init_state = step.init_state  # what the Trainer asks of its step besides a call
    trainer.train_step.plan = step.plan
    result = trainer.run()
    return {"skipped": [r["step"] for r in result.history if r.get("skipped")],
            "unchanged_at_2": all(torch.equal(a, b) for a, b in zip(seen[1], seen[2])),
            "final": [t.flatten().tolist() for t in tree.leaves(result.state.params)]}  # lists: they pickle


def hang_and_blame(timeout_s: float) -> tuple[str, bool] | None:
    """Rank 1 stays alive (its heartbeat beats) but never joins rank 0's collective."""
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    try:
        with Session(SimpleNamespace(run=SimpleNamespace(timeout_s=timeout_s))):
            if dist.get_rank() == 1:
                time.sleep(timeout_s + 5)  # past rank 0's timeout and its 3 s of watching
            else:
                dist.all_reduce(torch.ones(1), group=group)
    except PeerFailure as failure:
        return str(failure), failure.speaker
    return None
