"""A prepared dataset read back: many memory-mapped shards seen as one list of documents.

Opening checks every shard against the manifest (header, size, document index, counts), so a
truncated or swapped shard fails at once with the file named; ``verify=True`` also re-hashes the
shards and checks every id against the vocabulary. Opened for a model (``open_dataset(...,
vocab_size=V)``), a dataset whose ids reach V is refused before training starts: by each shard's
largest id as the manifest records it, or, for a manifest without one, by reading the shard; and
every packed row is checked again as it is read (a shard changed after ``prepare``). Documents are
zero-copy views.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from fastllm.data.format import ShardError, open_shard, payload_sha256
from fastllm.data.prepare import FORMAT_NAME, MANIFEST
from fastllm.errors import UserError

__all__ = ["TokenDataset", "open_dataset", "read_manifest", "recorded_eos", "split_documents"]


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a prepared dataset directory, with a clear error when there is none."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        hint = " (shards but no manifest: an interrupted `prepare`; run it again)" if any(
            Path(path).glob("shard-*")) or any(Path(path).glob(".prepare-*")) else ""
        raise FileNotFoundError(f"{path}: not a prepared dataset, no {MANIFEST}{hint}")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardError(f"{file}: corrupt manifest ({getattr(error, 'msg', None) or error.reason})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ShardError(f"{file}: not a {FORMAT_NAME} manifest")
    _check_schema(manifest, file)
    return manifest


def _check_schema(manifest: dict, file: Path) -> None:
    """The fields the reader relies on, with their types, so a hand-edited manifest fails here."""
    tokenizer = manifest.get("tokenizer")
    ok = (isinstance(tokenizer, dict) and all(isinstance(tokenizer.get(k), int) for k in ("vocab_size", "eos_id"))
          and isinstance(tokenizer.get("sha256"), str) and isinstance(manifest.get("documents"), int)
          and isinstance(manifest.get("tokens"), int) and isinstance(manifest.get("shards"), list)
          and all(isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("tokens"), int)
                  and isinstance(s.get("documents"), int) and isinstance(s.get("max_id", 0), int)
                  for s in manifest["shards"]))
    if not ok:
        raise ShardError(f"{file}: corrupt manifest (missing or mistyped fields; expected tokenizer.vocab_size, "
                         "tokenizer.eos_id, tokenizer.sha256, documents, tokens and shards[].file/tokens/documents)")


def recorded_eos(path: str | os.PathLike) -> Optional[str]:
    """The EOS token ``prepare`` appended to the documents of the dataset at ``path``; ``None`` when
    its manifest cannot be read (the data moved on)."""
    try:
        return read_manifest(path)["tokenizer"].get("eos_token")
    except (OSError, UserError):
        return None


class TokenDataset:
    """Documents of a prepared dataset; ``document(i)`` is a view of its token ids (EOS included)."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = False):
        self.path = str(path)
        self.manifest = read_manifest(path)
        tokenizer = self.manifest["tokenizer"]
        self.vocab_size: int = tokenizer["vocab_size"]
        self.tokenizer_sha256: str = tokenizer["sha256"]
        self.eos_id: int = tokenizer["eos_id"]
        self.shards = [self._open(entry, verify) for entry in self.manifest["shards"]]
        self.id_limit: Optional[int] = None  # ids must stay below it (set by check_ids)
        self.has_loss_mask = bool(self.manifest.get("has_loss_mask"))
        # Global document d lives in shard doc_shard[d] at tokens[doc_start[d]:doc_start[d] + lengths[d]].
        self.lengths = np.concatenate([np.diff(s.offsets).astype(np.int64) for s in self.shards])
        self.doc_start = np.concatenate([s.offsets[:-1].astype(np.int64) for s in self.shards])
        self.doc_shard = np.repeat(np.arange(len(self.shards), dtype=np.int32), [s.n_docs for s in self.shards])
        if len(self.lengths) != self.manifest["documents"]:
            raise ShardError(f"{self.path}: shards hold {len(self.lengths)} documents, manifest says "
                             f"{self.manifest['documents']}")

    def _open(self, entry: dict, verify: bool):
        file = Path(self.path) / entry["file"]
        if not file.is_file():
            raise ShardError(f"{file}: shard listed in the manifest is missing")
        shard = open_shard(file)
        if (shard.n_tokens, shard.n_docs) != (entry["tokens"], entry["documents"]):
            raise ShardError(f"{file}: holds {shard.n_tokens} tokens / {shard.n_docs} documents but the manifest "
                             f"says {entry['tokens']} / {entry['documents']} (a shard from another run?)")
        if verify:
            if payload_sha256(file) != entry.get("sha256"):
                raise ShardError(f"{file}: checksum mismatch, the shard is corrupt")
            if shard.n_tokens and int(shard.tokens.max()) >= self.vocab_size:
                raise ShardError(f"{file}: token id {int(shard.tokens.max())} >= vocab_size {self.vocab_size}")
        return shard

    def check_ids(self, vocab_size: int) -> None:
        """Refuse a dataset holding a token id >= ``vocab_size``: the manifest's per-shard largest id
        when recorded (no data read), else each shard's ids. Rows read later are checked too."""
        for entry, shard in zip(self.manifest["shards"], self.shards):
            largest = entry.get("max_id")
            if largest is None and shard.n_tokens:
                largest = int(shard.tokens.max())
            if largest is not None and largest >= vocab_size:
                raise ShardError(f"{Path(self.path) / entry['file']}: holds token id {largest}, but the model's "
                                 f"vocab_size is {vocab_size} (ids must be < {vocab_size}); prepare the data with "
                                 "the model's tokenizer")
        self.id_limit = vocab_size

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["tokens"])

    def document(self, index: int) -> np.ndarray:
        shard = self.shards[self.doc_shard[index]]
        start = self.doc_start[index]
        return shard.tokens[start:start + self.lengths[index]]

    def loss_mask(self, index: int) -> Optional[np.ndarray]:
        """1 where the token is a loss target (SFT response), or None for plain pretraining data."""
        if not self.has_loss_mask:
            return None
        shard = self.shards[self.doc_shard[index]]
        start = self.doc_start[index]
        return shard.loss_mask[start:start + self.lengths[index]]


def open_dataset(path: str | os.PathLike, *, verify: bool = False, vocab_size: Optional[int] = None,
                 tokenizer_sha256: Optional[str] = None) -> TokenDataset:
    """Open a prepared dataset, optionally checking it against a model's vocabulary and tokenizer."""
    dataset = TokenDataset(path, verify=verify)
    if vocab_size is not None and dataset.vocab_size > vocab_size:
        raise ShardError(f"{path}: prepared with a tokenizer of {dataset.vocab_size} ids but the model's "
                         f"vocab_size is {vocab_size}; re-run prepare with the model's tokenizer")
    if vocab_size is not None:
        dataset.check_ids(vocab_size)
    if tokenizer_sha256 is not None and dataset.tokenizer_sha256 != tokenizer_sha256:
        raise ShardError(f"{path}: prepared with tokenizer {dataset.tokenizer_sha256[:12]}, expected "
                         f"{tokenizer_sha256[:12]}")
    return dataset


def split_documents(n_docs: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, validation) document ids, both sorted; the split depends only on
    (n_docs, fraction, seed), never on the training seed, so the validation set stays put."""
    if not 0.0 <= validation_fraction < 1.0:
        raise UserError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    n_validation = int(round(n_docs * validation_fraction))
    if validation_fraction > 0:
        n_validation = min(max(n_validation, 1), n_docs - 1)
        if n_docs < 2:
            raise UserError(f"cannot split {n_docs} document(s) into train and validation")
    order = np.random.Generator(np.random.PCG64([seed, 0x5B17])).permutation(n_docs)
    return np.sort(order[n_validation:]), np.sort(order[:n_validation])
