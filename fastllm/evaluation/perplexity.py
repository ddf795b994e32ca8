"""Loss and perplexity of a model on a prepared dataset, through the training's own eval step.

The dataset (``fastllm prepare``'s output, held out from training) is packed into rows of
``seq_len`` tokens as training packs it, and read once: ``rows // batch_size`` batches (or
``max_batches``). The loss is the mean next-token cross-entropy over every valid target token
(nats), the perplexity ``exp(loss)``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

__all__ = ["EvalResult", "evaluate_checkpoint", "evaluate_params"]


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy per target token, nats
    perplexity: float
    tokens: int  # target tokens scored
    batches: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batches(data_dir: str | os.PathLike, seq_len: int, batch_size: int, vocab_size: int,
             max_batches: Optional[int]):
    from fastllm.data import DataConfig, make_loader, open_dataset

    total = int(open_dataset(data_dir, vocab_size=vocab_size).lengths.sum())
    count = max(1, (total - 1) // seq_len // batch_size)
    count = count if max_batches is None else min(count, max_batches)
    config = DataConfig(datasets=(str(data_dir),), seq_len=seq_len, validation_fraction=0.0, prefetch=0,
                        vocab_size=vocab_size)
    loader = make_loader(config, micro_batch_size=batch_size)
    return (next(loader) for _ in range(count)), count


def evaluate_params(model_config: Any, params: Any, data_dir: str | os.PathLike, *, seq_len: Optional[int] = None,
                    batch_size: int = 8, max_batches: Optional[int] = None) -> EvalResult:
    """Evaluate a built-in decoder (``model_config``, whole ``params`` on one device) on ``data_dir``."""
    from fastllm import models
    from fastllm.sharding import Mesh, Partitioner
    from fastllm.train.step import EvalStep

    device = next(iter(params["embed"].values())).device
    seq_len = seq_len or min(model_config.max_seq_len, 1024)
    step = EvalStep(models.model(model_config), Partitioner(Mesh.local(device)))
    batches, count = _batches(data_dir, seq_len, batch_size, model_config.vocab_size, max_batches)
    total = weight = 0.0
    for batch in batches:
        metrics = step(params, {name: value.to(device) for name, value in batch.items()})
        total += metrics["loss"].item() * metrics["tokens"].item()
        weight += metrics["tokens"].item()
    loss = total / max(weight, 1.0)
    return EvalResult(loss, math.exp(min(loss, 700.0)), int(weight), count)


def evaluate_checkpoint(checkpoint: str | os.PathLike, data_dir: str | os.PathLike, *,
                        seq_len: Optional[int] = None, batch_size: int = 8, max_batches: Optional[int] = None,
                        device: str = "cpu") -> EvalResult:
    """Evaluate any model directory :func:`fastllm.hf.load_any` reads (a run, a training
    checkpoint, a fastllm or a Hugging Face directory) on the prepared dataset ``data_dir``."""
    from fastllm import hf
    from fastllm.errors import UserError

    loaded = hf.load_any(checkpoint, dtype=torch.float32, device=device)
    if seq_len is not None and seq_len > loaded.config.max_seq_len:
        raise UserError(f"--seq-len {seq_len} exceeds the model's max_seq_len={loaded.config.max_seq_len}")
    return evaluate_params(loaded.config, loaded.params, data_dir, seq_len=seq_len, batch_size=batch_size,
                           max_batches=max_batches)
