"""``prepare``: tokenize text inputs into memory-mapped token shards plus a JSON manifest.

Documents are tokenized in worker processes (in input order), an EOS id is appended to each, and
the ids are written to shards of about ``shard_tokens`` tokens (see :mod:`fastllm.data.format`).
With ``prompt_field``/``response_field`` each document is ``prompt + response + EOS`` and a loss
mask excludes the prompt tokens (supervised fine-tuning).

Re-running with the same inputs, tokenizer and options finds the manifest's fingerprint unchanged
and does nothing. Shards are written into a staging directory (``output/.prepare-*``) and moved
into place only after every input was read; the manifest is written last and atomically, so a
directory without ``manifest.json`` is an unfinished run and is never read as data, and bad input
found halfway leaves the dataset that was there untouched. The manifest records each shard's
largest token id, so training refuses ids its model's vocabulary cannot hold without reading the data.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from collections import deque
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np

from fastllm.data.format import ShardWriter, open_shard, token_dtype
from fastllm.data.progress import Progress
from fastllm.data.sources import Source, file_sha256, read_records, resolve_inputs
from fastllm.data.tokenizer import TokenizerInfo, load_tokenizer
from fastllm.errors import UserError, read_json

__all__ = ["prepare", "MANIFEST", "FORMAT_NAME"]

MANIFEST = "manifest.json"
FORMAT_NAME = "fastllm-tokens"
_SHARD_GLOB = "shard-*.fltok"

# Per-process tokenizer of a worker, set once by the pool initializer (workers are separate
# processes, so this is process-local state, not shared between callers).
_worker: dict[str, Any] = {}


def _init_worker(tokenizer_json: str) -> None:
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool already uses every core
    _worker["tokenizer"] = Tokenizer.from_str(tokenizer_json)


def _encode(tokenizer, records: list, eos_id: int, add_special_tokens: bool):
    """A batch of records -> (concatenated ids uint32, per-document lengths, loss mask or None)."""
    parts = [tokenizer.encode_batch([r[i] for r in records], add_special_tokens=add_special_tokens)
             for i in range(len(records[0]))]
    docs, masks = [], []
    for encodings in zip(*parts):
        ids = [np.asarray(e.ids, dtype=np.uint32) for e in encodings]
        if sum(len(i) for i in ids) == 0:
            continue  # an empty text is no document
        docs.append(np.concatenate(ids + [np.asarray([eos_id], dtype=np.uint32)]))
        if len(ids) == 2:  # prompt tokens out of the loss; response and EOS in
            masks.append(np.concatenate([np.zeros(len(ids[0]), np.uint8), np.ones(len(ids[1]) + 1, np.uint8)]))
    lengths = np.asarray([len(d) for d in docs], dtype=np.int64)
    tokens = np.concatenate(docs) if docs else np.zeros(0, np.uint32)
    mask = (np.concatenate(masks) if masks else np.zeros(0, np.uint8)) if len(parts) == 2 else None
    return tokens, lengths, mask, len(records) - len(docs)


def _encode_in_worker(records: list, eos_id: int, add_special_tokens: bool):
    return _encode(_worker["tokenizer"], records, eos_id, add_special_tokens)


def _batches(sources: list[Source], fields: list[str], text_mode: str, batch_docs: int,
             position: dict) -> Iterator[list]:
    for index, source in enumerate(sources):
        batch = []
        for record in read_records(source, fields, text_mode):
            batch.append(record)
            if len(batch) == batch_docs:
                yield batch
                batch = []
        if batch:
            yield batch
        position["files_done"] = index + 1


def _encoded(tokenizer, info: TokenizerInfo, batches: Iterator[list], workers: int, add_special: bool):
    """Encoded batches in input order; at most ``2 * workers`` batches in flight (bounded memory)."""
    if workers <= 1:
        for batch in batches:
            yield _encode(tokenizer, batch, info.eos_id, add_special)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(info.json,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch, info.eos_id, add_special)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _fingerprint(sources: list[Source], info: TokenizerInfo, options: dict) -> tuple[list, str]:
    described = [{"path": s.path, "kind": s.kind,
                  "files": [{"file": f, "bytes": os.path.getsize(f), "sha256": file_sha256(f)} for f in s.files]}
                 for s in sources]
    key = json.dumps({"sources": [[f["sha256"] for f in s["files"]] for s in described],
                      "tokenizer": info.sha256, "eos_id": info.eos_id, "options": options}, sort_keys=True)
    return described, hashlib.sha256(key.encode()).hexdigest()


def _is_complete(output: Path, manifest: dict) -> bool:
    try:
        shards = [open_shard(output / s["file"]) for s in manifest["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(s.n_tokens == m["tokens"] for s, m in zip(shards, manifest["shards"]))


def _clear(output: Path) -> None:
    """Remove what an earlier run of ours left: the manifest first, so no half state is readable."""
    (output / MANIFEST).unlink(missing_ok=True)
    for path in list(output.glob(_SHARD_GLOB)) + list(output.glob("*.partial")):
        path.unlink()


def _write_shards(output: Path, encoded, dtype, with_mask: bool, shard_tokens: int, progress, position):
    shards, writer, docs, tokens, skipped = [], None, 0, 0, 0

    def publish():
        shards.append({"file": Path(writer.path).name, "tokens": writer.n_tokens, "documents": writer.n_docs,
                       "max_id": writer.max_id, "sha256": writer.close()})

    try:
        for batch_tokens, lengths, mask, batch_skipped in encoded:
            skipped += batch_skipped
            starts = np.concatenate([[0], np.cumsum(lengths)])
            for i, length in enumerate(lengths):
                if writer is None:
                    writer = ShardWriter(output / f"shard-{len(shards):05d}.fltok", dtype, with_mask)
                span = slice(starts[i], starts[i] + length)
                writer.add(batch_tokens[span], mask[span] if with_mask else None)
                if writer.n_tokens >= shard_tokens:
                    publish()
                    writer = None
            docs, tokens = docs + len(lengths), tokens + int(starts[-1])
            progress.update(docs, tokens, position["files_done"], position["files_total"])
        if writer is not None:
            publish()
        progress.update(docs, tokens, position["files_done"], position["files_total"], force=True)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return shards, docs, tokens, skipped


def _check_options(prompt_field, response_field, text_mode: str, shard_tokens: int, batch_docs: int,
                   workers: Optional[int]) -> None:
    if (prompt_field is None) != (response_field is None):
        raise UserError("prompt_field and response_field go together (supervised fine-tuning data)")
    if text_mode not in ("file", "line"):
        raise UserError(f"text_mode must be 'file' or 'line', got {text_mode!r}")
    if shard_tokens < 1 or batch_docs < 1 or (workers is not None and workers < 1):
        raise UserError(f"shard_tokens, batch_docs and workers must be >= 1, got {shard_tokens}, {batch_docs}, "
                        f"{workers}")


def _existing(output: Path) -> Optional[dict]:
    """The manifest already in ``output`` ({} when unreadable: a dataset of unknown origin), or None."""
    if not (output / MANIFEST).is_file():
        return None
    try:
        return read_json(output / MANIFEST, "manifest")
    except UserError:
        return {}


def _publish(staging: Path, output: Path, shards: list[dict], manifest: dict) -> None:
    """Replace what ``output`` held by the staged shards: old manifest out first, new one in last, so
    a crash in between leaves shards without a manifest (read as unfinished), never a mix."""
    _clear(output)
    for shard in shards:
        os.replace(staging / shard["file"], output / shard["file"])
    temporary = output / (MANIFEST + ".partial")
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, output / MANIFEST)


def prepare(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    tokenizer: str | os.PathLike,
    output: str | os.PathLike,
    *,
    text_field: str = "text",
    prompt_field: Optional[str] = None,
    response_field: Optional[str] = None,
    workers: Optional[int] = None,
    eos_token: Optional[str] = None,
    add_special_tokens: bool = False,
    text_mode: str = "file",
    shard_tokens: int = 1 << 28,
    batch_docs: int = 256,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize ``inputs`` with ``tokenizer`` into ``output``; returns the manifest (also written
    to ``output/manifest.json``). See the module docstring for the format and guarantees.

    Shards are written into a staging directory inside ``output`` and moved into place only once
    every input was read, so bad input (or an interruption) leaves a dataset already there intact."""
    _check_options(prompt_field, response_field, text_mode, shard_tokens, batch_docs, workers)
    fields = [prompt_field, response_field] if prompt_field else [text_field]
    sources = resolve_inputs(inputs)
    backend, info = load_tokenizer(tokenizer, eos_token)
    options = {"fields": fields, "text_mode": text_mode, "add_special_tokens": add_special_tokens,
               "shard_tokens": shard_tokens}
    described, fingerprint = _fingerprint(sources, info, options)

    output = Path(output)
    existing = _existing(output)
    if existing and existing.get("fingerprint") == fingerprint and _is_complete(output, existing):
        return existing  # same inputs, tokenizer and options: nothing to do
    if existing is not None and existing.get("fingerprint") != fingerprint and not overwrite:
        raise FileExistsError(f"{output} holds a dataset prepared from other inputs, tokenizer or options; "
                              "pass overwrite=True (--overwrite) or choose another output directory")
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=output))
    try:
        shards, docs, tokens, skipped = _tokenize(sources, fields, text_mode, (backend, info), workers,
                                                  add_special_tokens, (batch_docs, shard_tokens), staging, progress)
        if docs == 0:
            raise UserError(f"no documents in {[s.path for s in sources]}: every input is empty "
                            f"(fields {fields}, {skipped} empty texts skipped)")
        manifest = {
            "format": FORMAT_NAME, "version": 1, "fingerprint": fingerprint, "sources": described,
            "tokenizer": {"path": info.path, "sha256": info.sha256, "vocab_size": info.vocab_size,
                          "eos_id": info.eos_id, "eos_token": info.eos_token},
            "options": options, "dtype": str(token_dtype(info.vocab_size).name),
            "has_loss_mask": prompt_field is not None, "documents": docs, "tokens": tokens,
            "skipped_empty": skipped, "shards": shards,
        }
        _publish(staging, output, shards, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(output.iterdir()):
            output.rmdir()  # bad input leaves no trace
    return manifest


def _tokenize(sources, fields, text_mode, tokenizer, workers, add_special_tokens, sizes, staging,
              progress) -> tuple[list[dict], int, int, int]:
    """(shards, documents, tokens, skipped empty texts), the shards written into ``staging``;
    ``tokenizer`` is (backend, info), ``sizes`` (documents per batch, tokens per shard)."""
    (backend, info), (batch_docs, shard_tokens) = tokenizer, sizes
    workers = workers if workers is not None else len(os.sched_getaffinity(0))
    position = {"files_done": 0, "files_total": len(sources)}
    bar = Progress("prepare", enabled=progress)
    batches = _batches(sources, fields, text_mode, batch_docs, position)
    encoded = _encoded(backend, info, batches, workers, add_special_tokens)
    try:
        return _write_shards(staging, encoded, token_dtype(info.vocab_size), len(fields) == 2, shard_tokens, bar,
                             position)
    finally:
        bar.close()
