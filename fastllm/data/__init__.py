"""Data pipeline: ``prepare`` text into memory-mapped token shards, then blend, pack and load them
deterministically in (seed, step, data-parallel rank). See docs/data.md."""

from fastllm.data.blending import Blend
from fastllm.data.config import DataConfig, DatasetSpec
from fastllm.data.dataset import TokenDataset, open_dataset, read_manifest, split_documents
from fastllm.data.format import ShardError
from fastllm.data.loader import Loader, build_split, make_loader
from fastllm.data.packing import IGNORE_INDEX, PackedSequences
from fastllm.data.prepare import prepare

__all__ = [
    "prepare",
    "DataConfig",
    "DatasetSpec",
    "make_loader",
    "Loader",
    "build_split",
    "TokenDataset",
    "open_dataset",
    "read_manifest",
    "split_documents",
    "PackedSequences",
    "Blend",
    "ShardError",
    "IGNORE_INDEX",
]
