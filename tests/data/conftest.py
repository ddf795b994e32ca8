"""Fixtures of the data tests: a generated corpus and a tiny word-level tokenizer trained on it
locally (nothing is downloaded)."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from data_helpers import WORDS, make_corpus, write_jsonl


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(make_corpus(200, seed=0) + [" ".join(WORDS)],
                                  trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_file):
    return Tokenizer.from_file(str(tokenizer_file))


@pytest.fixture(scope="session")
def prepared_datasets(tmp_path_factory, tokenizer_file):
    """Three prepared datasets of different sizes, for packing, blending and loader tests."""
    from fastllm.data import prepare

    root = tmp_path_factory.mktemp("prepared")
    paths = []
    for index, count in enumerate((300, 200, 120)):
        source = write_jsonl(root / f"source{index}.jsonl", make_corpus(count, seed=10 + index))
        prepare([source], tokenizer_file, root / f"ds{index}", workers=1, progress=False, shard_tokens=2000)
        paths.append(str(root / f"ds{index}"))
    return paths
