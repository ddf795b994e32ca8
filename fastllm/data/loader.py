"""The training loader: deterministic in (seed, step, data-parallel rank), resumable from a few ints.

Step ``s`` consumes the global samples ``[s G, (s + 1) G)`` (G = global batch size, in rows). Rank
``r`` of ``n`` takes the contiguous slice ``[s G + r G/n, s G + (r + 1) G/n)`` and cuts it into
``grad_accumulation`` micro-batches. Sample ``i`` is located by the blend (dataset, index within it)
and read as one packed row, so the union over ranks of a step is the same G samples whatever the
data-parallel size, and no rank reads another's rows. The state is (step, micro_step) plus the
numbers that must match on resume (seed, global batch size, sequence length).

A daemon thread prepares ``prefetch`` micro-batches ahead, so the training loop does not wait on
the disk; the state counts only batches handed out, so prefetching never changes what is resumed.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Optional

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from fastllm import random
from fastllm.data.blending import Blend
from fastllm.data.config import DataConfig
from fastllm.data.dataset import open_dataset, split_documents
from fastllm.data.packing import PackedSequences
from fastllm.errors import UserError

__all__ = ["Loader", "make_loader", "build_split"]

Batch = dict[str, Int[Tensor, "batch seq"]]


def build_split(config: DataConfig, split: str = "train") -> tuple[list[PackedSequences], Blend]:
    """The packed datasets of one split (``"train"`` or ``"validation"``) and their blend."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    if split == "validation" and not config.validation and config.validation_fraction == 0:
        raise UserError("split='validation' needs data.validation datasets or data.validation_fraction > 0")
    specs = config.validation if (split == "validation" and config.validation) else config.datasets
    if not specs:
        raise UserError("data.datasets: no datasets configured")
    datasets = [open_dataset(s.path, verify=config.verify, vocab_size=config.vocab_size) for s in specs]
    for spec, dataset in zip(specs[1:], datasets[1:]):
        if dataset.tokenizer_sha256 != datasets[0].tokenizer_sha256:
            raise UserError(f"{spec.path} was tokenized with tokenizer {dataset.tokenizer_sha256[:12]} but "
                             f"{specs[0].path} with {datasets[0].tokenizer_sha256[:12]}; blend only datasets "
                             "prepared with the same tokenizer")
    root = random.fold_in(random.key(config.seed), split)
    packed = []
    for index, dataset in enumerate(datasets):
        docs = np.arange(len(dataset))
        if config.validation_fraction > 0:
            train, validation = split_documents(len(dataset), config.validation_fraction, config.split_seed)
            docs = train if split == "train" else validation
        packed.append(PackedSequences(dataset, docs, config.seq_len, random.fold_in(root, "dataset", index),
                                      split_long_documents=config.split_long_documents,
                                      mask_cross_document_loss=config.mask_cross_document_loss,
                                      document_attention=config.document_attention))
    return packed, Blend([s.weight for s in specs], root, config.blend_block_size)


class Loader:
    """Iterates micro-batches of this rank forever; see the module docstring for the order."""

    def __init__(self, config: DataConfig, packed: list[PackedSequences], blend: Blend, *, micro_batch_size: int,
                 grad_accumulation: int, dp_rank: int, dp_size: int):
        self.config = config
        self.packed, self.blend = packed, blend
        self.micro_batch_size, self.grad_accumulation = micro_batch_size, grad_accumulation
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch_size = micro_batch_size * grad_accumulation * dp_size
        self.step, self.micro_step = 0, 0
        self._queue: Optional[queue.Queue] = None
        self._stop: Optional[threading.Event] = None
        self._thread: Optional[threading.Thread] = None

    def sample_indices(self, step: int, micro_step: int) -> np.ndarray:
        """Global sample indices of this rank's micro-batch ``micro_step`` of ``step``."""
        start = (step * self.global_batch_size + self.dp_rank * (self.global_batch_size // self.dp_size)
                 + micro_step * self.micro_batch_size)
        return np.arange(start, start + self.micro_batch_size, dtype=np.int64)

    def batch(self, step: int, micro_step: int = 0) -> Batch:
        """Random access to any micro-batch: {"tokens", "targets", "positions", "segment_ids"} (the
        last two with ``document_attention`` only), int64 [micro_batch_size, seq_len]; targets hold
        -100 where the loss must skip."""
        datasets, within = self.blend.locate(self.sample_indices(step, micro_step))
        rows = [self.packed[d].row(int(i)) for d, i in zip(datasets, within)]
        batch = {name: torch.from_numpy(np.stack([row[name] for row in rows])) for name in rows[0]}
        if self.config.pin_memory and torch.cuda.is_available():
            batch = {name: tensor.pin_memory() for name, tensor in batch.items()}
        return batch

    def _advance(self, step: int, micro_step: int) -> tuple[int, int]:
        micro_step += 1
        return (step + 1, 0) if micro_step == self.grad_accumulation else (step, micro_step)

    def _produce(self, step: int, micro_step: int, out: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                item = (step, micro_step, self.batch(step, micro_step))
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.05)
                        break
                    except queue.Full:
                        continue
                step, micro_step = self._advance(step, micro_step)
        except BaseException as error:  # handed to the consumer, raised there
            out.put((None, None, error))

    def _start(self) -> None:
        self._queue, self._stop = queue.Queue(maxsize=self.config.prefetch), threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True, name="fastllm-data-prefetch",
                                        args=(self.step, self.micro_step, self._queue, self._stop))
        self._thread.start()

    def close(self) -> None:
        """Stop the prefetch thread (a later ``next`` starts it again from the current state)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = self._queue = self._stop = None

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> Batch:
        if self.config.prefetch == 0:
            batch = self.batch(self.step, self.micro_step)
        else:
            if self._thread is None:
                self._start()
            step, micro_step, batch = self._queue.get()
            if step is None:
                self.close()
                raise batch
            assert (step, micro_step) == (self.step, self.micro_step), "prefetch out of order"
        self.step, self.micro_step = self._advance(self.step, self.micro_step)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "micro_step": self.micro_step, "seed": self.config.seed,
                "global_batch_size": self.global_batch_size, "seq_len": self.config.seq_len,
                "dp_size": self.dp_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume after the batches ``state`` counts. The data-parallel size may change between
        runs (the global order does not depend on it), but only at a step boundary."""
        for name in ("seed", "global_batch_size", "seq_len"):
            mine = self.state_dict()[name]
            if int(state[name]) != mine:
                raise UserError(f"loader state has {name}={state[name]} but this loader has {mine}; "
                                 "resuming would change the data order")
        if int(state["micro_step"]) != 0 and int(state["dp_size"]) != self.dp_size:
            raise UserError("the data-parallel size can only change at a step boundary (micro_step 0)")
        self.close()
        self.step, self.micro_step = int(state["step"]), int(state["micro_step"])


def make_loader(config: DataConfig, *, micro_batch_size: int, global_batch_size: Optional[int] = None,
                grad_accumulation: Optional[int] = None, dp_rank: int = 0, dp_size: int = 1,
                split: str = "train") -> Loader:
    """This rank's loader. Give ``global_batch_size`` (rows per optimizer step, all ranks) or
    ``grad_accumulation`` (micro-batches per step per rank), or neither for one micro-batch a step."""
    if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise UserError(f"need micro_batch_size >= 1 and 0 <= dp_rank < dp_size, got {micro_batch_size}, "
                         f"{dp_rank}, {dp_size}")
    if global_batch_size is not None and grad_accumulation is not None:
        if global_batch_size != micro_batch_size * dp_size * grad_accumulation:
            raise UserError(f"global_batch_size {global_batch_size} != micro_batch_size {micro_batch_size} * "
                             f"dp_size {dp_size} * grad_accumulation {grad_accumulation}")
    if global_batch_size is not None:
        if global_batch_size % (micro_batch_size * dp_size):
            raise UserError(f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
                             f"{micro_batch_size} * dp_size {dp_size}")
        grad_accumulation = global_batch_size // (micro_batch_size * dp_size)
    grad_accumulation = grad_accumulation or 1
    packed, blend = build_split(config, split)
    return Loader(config, packed, blend, micro_batch_size=micro_batch_size, grad_accumulation=grad_accumulation,
                  dp_rank=dp_rank, dp_size=dp_size)
