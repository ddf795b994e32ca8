"""Data pipeline throughput: ``prepare`` tokens/s and loader tokens/s, printed as JSON lines.

    python benchmarks/data_throughput.py                  # ~13M tokens; minutes on 2 cores
    python benchmarks/data_throughput.py --docs 10000     # ~4.4M tokens (docs/performance.md)

It generates a corpus of Zipf-distributed pseudo-words (nothing is downloaded), trains a byte-level
BPE tokenizer on a sample of it, prepares three datasets, then reads blended, packed batches of
``seq_len`` 2048 back with and without prefetch. The shards are read through the page cache, as a
training run re-reading its data does; the first pass also pays the page faults.
Also measured: how long ``next(loader)`` blocks when the consumer spends ``--step-ms`` per batch,
which is what a training loop waits on the data.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def make_corpus(directory: Path, docs: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(20_000)]
    ranks = np.arange(1, len(words) + 1)
    p = 1.0 / ranks
    p /= p.sum()
    lengths = np.clip(rng.lognormal(5.5, 0.8, size=docs), 10, 5000).astype(np.int64)  # ~300 words
    ids = rng.choice(len(words), int(lengths.sum()), p=p)
    ends = np.cumsum(lengths)
    files = []
    for part in range(3):
        path = directory / f"part{part}.jsonl"
        with open(path, "w") as f:
            for d in range(part, docs, 3):
                f.write(json.dumps({"text": " ".join(words[i] for i in ids[ends[d] - lengths[d]:ends[d]])}) + "\n")
        files.append(path)
    return files


def train_tokenizer(files: list[Path], path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    with open(files[0]) as f:
        sample = [json.loads(line)["text"] for _, line in zip(range(2000), f)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(sample, trainer)
    tokenizer.save(str(path))


def measure_prepare(files, tokenizer, out: Path, workers: int) -> dict:
    from fastllm.data import prepare

    start = time.perf_counter()
    tokens = 0
    for index, file in enumerate(files):
        tokens += prepare([file], tokenizer, out / f"ds{index}", workers=workers, progress=False,
                          overwrite=True)["tokens"]
    seconds = time.perf_counter() - start
    return {"bench": "prepare", "workers": workers, "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds)}


def measure_loader(paths, seq_len: int, micro: int, batches: int, prefetch: int, step_ms: float) -> dict:
    from fastllm.data import DataConfig, make_loader

    config = DataConfig(datasets=tuple(zip(map(str, paths), (0.5, 0.3, 0.2))), seq_len=seq_len, seed=0,
                        prefetch=prefetch, mask_cross_document_loss=True)
    loader = make_loader(config, micro_batch_size=micro)
    next(loader)  # opens the epoch order; not timed
    waited, start = 0.0, time.perf_counter()
    for _ in range(batches):
        before = time.perf_counter()
        next(loader)
        waited += time.perf_counter() - before
        if step_ms:
            time.sleep(step_ms / 1000)  # stands for the train step; the GIL is released as on a GPU wait
    seconds = time.perf_counter() - start
    loader.close()
    tokens = batches * micro * seq_len
    return {"bench": "loader", "prefetch": prefetch, "seq_len": seq_len, "micro_batch": micro,
            "batches": batches, "step_ms": step_ms, "mean_wait_ms": round(1000 * waited / batches, 3),
            **({} if step_ms else {"tokens_per_s": round(tokens / seconds)})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=30_000)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=20.0)
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    directory = Path(args.dir or tempfile.mkdtemp(prefix="fastllm-data-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    files = make_corpus(directory, args.docs, seed=0)
    train_tokenizer(files, directory / "tokenizer.json", args.vocab)
    cores = len(os.sched_getaffinity(0))
    print(json.dumps({"bench": "machine", "cores": cores, "corpus_bytes": sum(f.stat().st_size for f in files)}))
    print(json.dumps(measure_prepare(files, directory / "tokenizer.json", directory / "one", workers=1)))
    print(json.dumps(measure_prepare(files, directory / "tokenizer.json", directory / "out", workers=cores)))
    paths = [directory / "out" / f"ds{i}" for i in range(3)]
    for prefetch in (0, 4):
        print(json.dumps(measure_loader(paths, args.seq_len, args.micro_batch, args.batches, prefetch, 0.0)))
    for prefetch in (0, 4):
        print(json.dumps(measure_loader(paths, args.seq_len, args.micro_batch, args.batches // 2, prefetch,
                                        args.step_ms)))


if __name__ == "__main__":
    main()
