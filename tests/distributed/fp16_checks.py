"""fp16 loss scaling on a mesh, inside spawned gloo ranks (see test_fp16.py)."""

from __future__ import annotations

import torch

from fastllm import models, optim, random, tree
from fastllm.sharding import Mesh, Partitioner
from fastllm.train.step import TrainStep

CONFIG = models.preset("tiny-llama")


def batches(n: int = 3) -> list[dict]:
    out = []
    for step in range(n):
        tokens = torch.randint(0, CONFIG.vocab_size, (4, 17), generator=torch.Generator().manual_seed(step))
        out.append({"tokens": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()})
    return out


def run(mesh: Mesh, scale: float, zero_stage: int = 0) -> dict:
    """Losses, loss scales and final params (whole) of 3 fp16 steps starting from ``scale``."""
    opt = optim.adamw(1e-3, weight_decay=0.1)
    step = TrainStep(models.model(CONFIG), Partitioner(mesh, zero_stage=zero_stage), opt, precision="fp16",
                     max_grad_norm=1.0)
    state = step.init_state(random.key(0), loss_scale=optim.dynamic_loss_scale(scale))
    first = tree.map(torch.clone, state.params)
    losses, scales = [], []
    for batch in batches():
        n, me = mesh.size("data"), mesh.rank("data")
        state, metrics = step(state, {name: value.chunk(n)[me] for name, value in batch.items()})
        losses.append(float(metrics["loss"]))
        scales.append(float(metrics["loss_scale"]))
    moved = max((a - b).abs().max().item() for a, b in zip(tree.leaves(state.params), tree.leaves(first)))
    return {"losses": losses, "scales": scales, "moved": moved}


def fp16_on_two_data_ranks() -> dict:
    """Every rank: (one process, data=2 ZeRO-1) for a normal scale and for one that overflows; and
    the verdict of a step where only rank 0 saw finite gradients."""
    report = {name: (run(Mesh.local(), scale), run(Mesh(data=2), scale, zero_stage=1))
              for name, scale in (("normal", 2.0**10), ("overflow", 2.0**120))}
    step = TrainStep(models.model(CONFIG), Partitioner(Mesh(data=2)), optim.sgd(0.1), precision="fp16")
    report["one rank finite"] = bool(step._agree(torch.tensor(torch.distributed.get_rank() == 0)))
    return report
