"""Helpers shared by the data tests: a generated corpus, JSONL writing, expected ids."""

import json
import random

from tokenizers import Tokenizer

WORDS = [f"w{i}" for i in range(60)]


def make_corpus(count: int, seed: int, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(count)]


def write_jsonl(path, texts, field="text"):
    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({field: text}) + "\n")
    return path


def expected_ids(tokenizer: Tokenizer, texts, eos_id: int) -> list[list[int]]:
    return [e.ids + [eos_id] for e in tokenizer.encode_batch(texts, add_special_tokens=False) if e.ids]
