"""Every call the GPU suite makes into fastllm's model and training APIs, in this one file.

When the APIs of ``fastllm.models`` and ``fastllm.train`` change, this is the file to update (the
tests only use the functions below): ``models.preset``, ``models.init``, ``models.model``, and the
one train step, ``train.step.TrainStep(model, Partitioner(Mesh.local(device)), optimizer, ...)``,
whose ``compile=True`` runs the decoder blocks through inductor.
"""

from __future__ import annotations

import torch

from fastllm import models, optim, random, tree
from fastllm.kernels import KernelConfig
from fastllm.sharding import Mesh, Partitioner
from fastllm.train.state import TrainState
from fastllm.train.step import TrainStep


def tiny_model(name: str, device: torch.device, **overrides):
    """(config, fp32 params on ``device``) of a tiny preset."""
    config = models.preset(name, **overrides)
    return config, models.init(config, random.key(0), device=device)


def batch(config, gen: torch.Generator, device: torch.device, *, rows: int = 4, seq: int = 64,
          packed: bool = False) -> dict:
    """Tokens, targets with ignored positions, a loss mask and, ``packed``, 2-3 documents a row."""
    tokens = torch.randint(0, config.vocab_size, (rows, seq + 1), generator=gen)
    targets = tokens[:, 1:].clone()
    targets[torch.rand(targets.shape, generator=gen) < 0.15] = -100
    data = {"tokens": tokens[:, :-1].contiguous(), "targets": targets,
            "loss_mask": torch.rand(rows, seq, generator=gen) > 0.1}
    if packed:
        starts = torch.randint(1, seq, (rows, 2), generator=gen)
        data["segment_ids"] = (torch.arange(seq)[None, None, :] >= starts[..., None]).sum(1)
    return {name: value.to(device) for name, value in data.items()}


def _step(config, device: torch.device, optimizer, **options) -> TrainStep:
    return TrainStep(models.model(config), Partitioner(Mesh.local(device)), optimizer, **options)


def loss_and_grads(config, params, data: dict, *, kernels: KernelConfig | None = None, compile: bool = False):
    """(loss, {path: gradient}) of one backward of the train step (autograd on the fp32 params);
    ``compile``: the decoder blocks through inductor."""
    config = config if kernels is None else config.replace(kernels=kernels)
    device = tree.leaves(params)[0].device
    optimizer = optim.sgd(0.0)
    step = _step(config, device, optimizer, compile=compile)
    grads, loss, _ = step.gradients(TrainState(params, optimizer.init(params), 0, random.key(1)), data)
    return loss.detach(), tree.flatten(grads)


def train_step(config, params, data: dict, *, compile: bool):
    """(params, loss) after one AdamW step (two micro-batches) of the train step.

    AdamW's ``eps`` is 1e-3: AdamW's first update is ``lr * g / (|g| + eps)``, so with the default
    1e-8 an entry whose gradient is near zero moves by about ``lr * sign(g)``, and the rounding-level
    difference of a compiled and an eager gradient (other fusions, other summation order) flips
    that sign: a difference of ``2 * lr`` on a weight of scale 0.08. A larger ``eps`` keeps the
    update a smooth function of the gradient, so compiled and eager agree to rounding."""
    optimizer = optim.adamw(1e-3, weight_decay=0.1, eps=1e-3)
    step = _step(config, tree.leaves(params)[0].device, optimizer, grad_accum=2, max_grad_norm=1.0, compile=compile)
    fresh = tree.map(torch.clone, params)  # the step writes the new params into its input (fused AdamW)
    state, metrics = step(TrainState(fresh, optimizer.init(fresh), 0, random.key(1)), data)
    return tree.flatten(state.params), metrics["loss"]


def bf16_steps(config, params, batches: list[dict], *, keep_copy: bool):
    """(losses, final params, the step) of AdamW steps in bf16, one micro-batch each; ``keep_copy``
    False casts the masters every step (the step's compute copy switched off)."""
    optimizer = optim.adamw(1e-3, weight_decay=0.1, eps=1e-3)  # eps: see train_step
    step = _step(config, tree.leaves(params)[0].device, optimizer, precision="bf16", max_grad_norm=1.0)
    if not keep_copy:
        step.compute_copy = None
    fresh = tree.map(torch.clone, params)
    state, losses = TrainState(fresh, optimizer.init(fresh), 0, random.key(1)), []
    for data in batches:
        state, metrics = step(state, data)
        losses.append(metrics["loss"])
    return losses, tree.flatten(state.params), step
