"""Hugging Face checkpoint directories on disk: config.json, safetensors shards, tokenizer files.

Only safetensors are read: a ``pytorch_model.bin`` is a pickle, and unpickling runs arbitrary code,
so a directory that has nothing else is refused. Tensors are read lazily, one at a time, so a
converter holds at most one source tensor beside its output.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from collections.abc import Iterator
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastllm.data.tokenizer import read_tokenizer
from fastllm.errors import UserError, read_json, reading

__all__ = [
    "SafetensorsReader",
    "read_config",
    "write_safetensors",
    "write_tokenizer",
    "copy_aux_files",
    "SINGLE_FILE",
    "INDEX_FILE",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
# files that describe the tokenizer and generation defaults; carried along by conversions
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
             "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint directory as a dict, refusing anything that needs remote code."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; not a Hugging Face checkpoint directory")
    raw = read_json(config_path, "Hugging Face config")
    if raw.get("auto_map"):
        raise UserError(f"{config_path}: 'auto_map' = {raw['auto_map']!r} asks for custom (remote) code; "
                         "fastllm never runs checkpoint code, only the built-in architectures are supported")
    return raw


class SafetensorsReader:
    """The tensors of a checkpoint directory (one file or index + shards), read by name on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file_of = self._locate(self.path)  # tensor name -> file name

    @staticmethod
    def _locate(path: Path) -> dict[str, str]:
        if (path / INDEX_FILE).is_file():
            weight_map = read_json(path / INDEX_FILE, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise UserError(f"{path / INDEX_FILE}: no 'weight_map' object of tensor name -> file name")
            for shard in set(weight_map.values()):
                if not (path / shard).is_file():
                    raise FileNotFoundError(f"{path / INDEX_FILE} names the shard {shard!r}, which is missing")
            return dict(weight_map)
        if (path / SINGLE_FILE).is_file():
            with reading(path / SINGLE_FILE, "safetensors"), safe_open(path / SINGLE_FILE, framework="pt") as f:
                return {name: SINGLE_FILE for name in f.keys()}
        pickles = [name for name in _PICKLE_FILES if (path / name).exists()]
        if pickles:
            raise UserError(f"{path}: only {', '.join(pickles)} found; fastllm requires safetensors "
                             f"({SINGLE_FILE} or {INDEX_FILE}) and never loads pickled weights. "
                             "Re-save with save_pretrained(..., safe_serialization=True).")
        raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")

    def names(self) -> list[str]:
        return list(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        file = self.path / self._file_of[name]
        with reading(file, "safetensors"), safe_open(file, framework="pt") as f:
            return f.get_tensor(name)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """Greedy split in insertion order; a tensor larger than the limit gets a shard of its own."""
    shard, size = {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor
        size += nbytes
    if shard:
        yield shard


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000k-of-0000n.safetensors shards plus the index transformers reads."""
    if max_shard_bytes <= 0:
        raise UserError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    path = Path(path)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    shards = list(_shards(tensors, max_shard_bytes))
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], path / SINGLE_FILE, metadata=metadata)
        return
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        file_name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file_name, metadata=metadata)
        weight_map.update({name: file_name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(path / INDEX_FILE, "w") as f:
        json.dump(index, f, indent=2)


def write_tokenizer(tokenizer, path: str | os.PathLike, specials: Optional[dict[str, str]] = None) -> None:
    """tokenizer.json (+ tokenizer_config.json) from a ``tokenizers.Tokenizer``, a tokenizer.json path
    or a directory holding one, in the layout ``transformers.AutoTokenizer.from_pretrained`` reads.

    ``specials`` (``{"bos_token": "<s>", "eos_token": "</s>"}``) fills in the tokenizer config's
    entries a copied config does not already set, so transformers knows where a sequence ends."""
    from tokenizers import Tokenizer

    path = Path(path)
    if isinstance(tokenizer, Tokenizer):
        tokenizer.save(str(path / "tokenizer.json"))
    elif isinstance(tokenizer, (str, os.PathLike)) and Path(tokenizer).is_dir():
        source = Path(tokenizer)
        if not (source / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer directory {source} has no tokenizer.json")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (source / name).is_file():
                shutil.copyfile(source / name, path / name)
    elif isinstance(tokenizer, (str, os.PathLike)) and Path(tokenizer).is_file():
        read_tokenizer(tokenizer)  # fail here, not in the user's later from_pretrained
        shutil.copyfile(tokenizer, path / "tokenizer.json")
    else:
        raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, a tokenizer.json path or a directory, "
                        f"got {tokenizer!r}")
    _write_tokenizer_config(path / "tokenizer_config.json", specials or {})


def _write_tokenizer_config(file: Path, specials: dict[str, str]) -> None:
    config = read_json(file, "tokenizer config") if file.is_file() else {"tokenizer_class": "PreTrainedTokenizerFast"}
    config = {**specials, **config}  # what a copied config says wins
    file.write_text(json.dumps(config, indent=2) + "\n")


def copy_aux_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Tokenizer and generation files travel with the weights through a conversion."""
    for name in AUX_FILES:
        if (Path(src) / name).is_file() and not (Path(dst) / name).exists():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
