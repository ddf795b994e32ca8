"""The Trainer's view of the data: one batch per optimizer step.

:func:`fastllm.data.make_loader` yields micro-batches (``grad_accum`` per step); the train step
takes the whole step's batch and splits it again itself, so :class:`StepBatches` concatenates the
micro-batches of a step along the batch dimension. Positions resume through the loader's state.
The loader pins its batches on CUDA (``data.pin_memory``) so that the Trainer's copy to the device
need not wait for the GPU; a concatenation is a new pageable tensor, so a step of several
micro-batches is pinned again and a step of one is passed on as the loader made it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["StepBatches", "build_loaders", "tokenizer_path"]


class StepBatches:
    """Iterator of step batches ``[micro_batch_size * grad_accum, seq]`` over a micro-batch loader."""

    def __init__(self, loader, grad_accum: int):
        self.loader, self.grad_accum = loader, grad_accum

    def __iter__(self) -> "StepBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        micro = [next(self.loader) for _ in range(self.grad_accum)]
        if len(micro) == 1:
            return micro[0]
        return {name: _pinned_like(torch.cat([m[name] for m in micro], dim=0), micro[0][name]) for name in micro[0]}

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def close(self) -> None:
        """End the loader's prefetch thread (the next batch starts it again)."""
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()


def _pinned_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return tensor.pin_memory() if like.is_pinned() else tensor


def _data_config(config):
    data = config.data
    vocab = getattr(config.model_config, "vocab_size", None)
    if data.vocab_size is None and vocab is not None:  # refuse datasets whose ids the model cannot embed
        data = data.replace(vocab_size=vocab)
    return data


def build_loaders(config, *, micro_batch_size: int, dp_rank: int = 0,
                  dp_size: int = 1) -> tuple[StepBatches, Optional[StepBatches]]:
    """(train batches, validation micro-batches or ``None``) for a :class:`fastllm.train.Config`:
    this data rank's share (``dp_rank`` of ``dp_size``) of each global batch of
    ``train.batch_size`` sequences, read ``micro_batch_size`` at a time."""
    from fastllm import data as fdata

    data, t = _data_config(config), config.train
    if not data.datasets:
        raise ValueError("data.datasets: no prepared dataset given (prepare one with `fastllm prepare`)")
    train = fdata.make_loader(data, micro_batch_size=micro_batch_size, global_batch_size=t.batch_size,
                               dp_rank=dp_rank, dp_size=dp_size)
    val = None
    if data.validation or data.validation_fraction > 0:
        val = StepBatches(fdata.make_loader(data, micro_batch_size=micro_batch_size, split="validation",
                                            dp_rank=dp_rank, dp_size=dp_size), 1)
    return StepBatches(train, train.grad_accumulation), val


def tokenizer_path(config) -> Optional[Path]:
    """The tokenizer the first training dataset was prepared with, when it still exists."""
    from fastllm.data import read_manifest

    if not config.data.datasets:
        return None
    recorded = read_manifest(config.data.datasets[0].path).get("tokenizer", {}).get("path")
    if not recorded:
        return None
    path = Path(recorded)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    return path if path.is_file() else None
