"""The data section of a training config: which prepared datasets, blended how, packed how.

A recipe names its datasets and weights::

    DataConfig(datasets=(("data/web", 0.7), ("data/code", 0.3)), seq_len=2048, seed=1)

Plain ``(path, weight)`` pairs, bare paths and dicts are turned into :class:`DatasetSpec` at
construction, and every field is checked there, with the field named in the error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from collections.abc import Sequence
from typing import Optional, Union

__all__ = ["DatasetSpec", "DataConfig"]

# What a recipe may write for a list of datasets; __post_init__ turns it into tuple[DatasetSpec, ...].
DatasetEntries = Union[Sequence[Union["DatasetSpec", tuple, list, str, dict]], "DatasetSpec", str]


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"data.{field_name}: {message}")


@dataclass(frozen=True)
class DatasetSpec:
    """A prepared dataset directory and its blending weight (normalised over all datasets)."""

    path: str
    weight: Union[float, int] = 1.0

    def __post_init__(self):
        _require(isinstance(self.path, str) and self.path != "", "datasets.path",
                 f"must be a non-empty path string, got {self.path!r}")
        _require(isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight > 0,
                 "datasets.weight", f"must be a positive number, got {self.weight!r} for {self.path}")


def _as_specs(entries, field_name: str) -> tuple[DatasetSpec, ...]:
    if isinstance(entries, (str, DatasetSpec, dict)):
        entries = (entries,)
    specs = []
    for entry in entries:
        if isinstance(entry, DatasetSpec):
            specs.append(entry)
        elif isinstance(entry, str):
            specs.append(DatasetSpec(entry))
        elif isinstance(entry, dict):
            specs.append(DatasetSpec(**entry))
        elif isinstance(entry, (tuple, list)) and len(entry) == 2:
            specs.append(DatasetSpec(str(entry[0]), float(entry[1])))
        else:
            raise ValueError(f"data.{field_name}: entries are paths, (path, weight) pairs or "
                             f"DatasetSpec, got {entry!r}")
    return tuple(specs)


@dataclass(frozen=True)
class DataConfig:
    """Datasets, packing and ordering. ``seed`` fixes the order of documents and of the blend;
    ``split_seed`` fixes which documents are held out for validation."""

    datasets: DatasetEntries = ()
    seq_len: int = 2048
    seed: int = 0
    validation_fraction: Union[float, int] = 0.0  # documents of each dataset held out for validation
    validation: DatasetEntries = ()  # or separate validation datasets
    split_seed: int = 0
    split_long_documents: bool = True  # False: truncate documents to seq_len tokens
    mask_cross_document_loss: bool = False  # ignore the target that crosses into the next document
    # True: a token attends only within its document (segment ids; positions restart at each one;
    # FlexAttention). False: a row is one stream, plain causal attention over all of it (the fused
    # SDPA kernel; what Megatron does by default and what the peers of benchmarks/ do).
    document_attention: bool = True
    prefetch: int = 4  # micro-batches prepared ahead by a background thread; 0: none
    # page-locked batches where CUDA is present: a copy from pageable memory first waits for the
    # GPU to drain its stream, so each step's batch copy would stall the host once per step
    pin_memory: bool = True
    vocab_size: Optional[int] = None  # the model's: datasets tokenized with a larger vocabulary are refused
    verify: bool = False  # re-hash shards and check every id when opening (slow on large data)
    blend_block_size: int = 4096

    def __post_init__(self):
        object.__setattr__(self, "datasets", _as_specs(self.datasets, "datasets"))
        object.__setattr__(self, "validation", _as_specs(self.validation, "validation"))
        _require(isinstance(self.seq_len, int) and self.seq_len >= 1, "seq_len",
                 f"must be a positive int, got {self.seq_len!r}")
        _require(isinstance(self.seed, int), "seed", f"must be an int, got {self.seed!r}")
        _require(0.0 <= self.validation_fraction < 1.0, "validation_fraction",
                 f"must be in [0, 1), got {self.validation_fraction}")
        _require(not (self.validation and self.validation_fraction > 0), "validation",
                 "give either validation datasets or validation_fraction, not both")
        _require(isinstance(self.prefetch, int) and self.prefetch >= 0, "prefetch",
                 f"must be an int >= 0, got {self.prefetch!r}")
        _require(self.vocab_size is None or self.vocab_size > 0, "vocab_size", "must be None or > 0")
        _require(self.blend_block_size >= 1, "blend_block_size", "must be >= 1")

    def replace(self, **changes) -> "DataConfig":
        return replace(self, **changes)
