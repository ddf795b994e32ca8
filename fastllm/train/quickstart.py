"""Quickstart data that every machine already has: the Python standard library's own source.

:func:`prepare_quickstart` writes a deterministic selection of stdlib ``.py`` files (sorted by
name, up to ``max_bytes``) as JSONL documents, trains a byte-level BPE tokenizer on them with the
``tokenizers`` library, and tokenizes them with :func:`fastllm.data.prepare`. Nothing is
downloaded. :func:`unigram_entropy` is the loss a model that ignores context could reach at best,
``H = -sum_t p(t) ln p(t)`` over the token frequencies, in nats like the training loss.
"""

from __future__ import annotations

import json
import math
import os
import sysconfig
from collections import Counter
from pathlib import Path

__all__ = ["stdlib_sources", "write_corpus", "train_tokenizer", "unigram_entropy", "prepare_quickstart", "EOS"]

EOS = "<|endoftext|>"


def stdlib_sources(max_bytes: int) -> list[Path]:
    """Top-level stdlib modules in name order, as many as fit in ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen, total = [], 0
    for file in sorted(root.glob("*.py")):
        size = file.stat().st_size
        if total + size > max_bytes:
            continue
        chosen.append(file)
        total += size
    if not chosen:
        raise FileNotFoundError(f"no Python standard library sources under {root}")
    return chosen


def write_corpus(path: str | Path, max_bytes: int) -> Path:
    """One JSONL record ``{"text": source}`` per chosen stdlib file. The file is replaced (through
    a rename) only when its content changes, so a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"text": file.read_text(encoding="utf-8", errors="replace")}) + "\n"
                   for file in stdlib_sources(max_bytes))
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return path


def train_tokenizer(corpus: str | Path, vocab_size: int, path: str | Path) -> Path:
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenization) with ``EOS`` as its special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = (json.loads(line)["text"] for line in Path(corpus).open())
    tokenizer.train_from_iterator(texts, trainer)
    tmp = Path(path).with_name(f"{Path(path).name}.tmp-{os.getpid()}")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)  # a run killed here leaves no half tokenizer for the next to reuse
    return Path(path)


def unigram_entropy(dataset: str | Path) -> float:
    """Entropy in nats of the token frequencies of a prepared dataset."""
    from fastllm.data import open_dataset

    data = open_dataset(dataset)
    counts: Counter = Counter()
    for index in range(len(data)):
        counts.update(data.document(index).tolist())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def prepare_quickstart(directory: str | Path, *, max_bytes: int, vocab_size: int) -> tuple[Path, Path]:
    """(prepared dataset directory, tokenizer.json) under ``directory``; reused when already there."""
    from fastllm.data import prepare

    directory = Path(directory)
    tokenizer, dataset = directory / "tokenizer.json", directory / "tokens"
    corpus = directory / "corpus.jsonl"
    before = corpus.stat().st_mtime_ns if corpus.is_file() else None
    write_corpus(corpus, max_bytes)
    if before == corpus.stat().st_mtime_ns and tokenizer.is_file() and (dataset / "manifest.json").is_file():
        return dataset, tokenizer  # prepared from this very corpus before: a second run reads it as it is
    if not tokenizer.is_file():
        train_tokenizer(corpus, vocab_size, tokenizer)
    prepare([corpus], tokenizer, dataset, eos_token=EOS, workers=1, progress=False, overwrite=True)
    return dataset, tokenizer
