"""Corrupt, truncated or mismatched data is refused with an error that names the problem."""

import json
import shutil

import numpy as np
import pytest

from data_helpers import make_corpus, write_jsonl
from fastllm.data import DataConfig, ShardError, TokenDataset, make_loader, open_dataset, prepare
from fastllm.data.format import HEADER_BYTES


@pytest.fixture
def dataset_dir(tmp_path, tokenizer_file):
    prepare([write_jsonl(tmp_path / "a.jsonl", make_corpus(60, seed=20))], tokenizer_file, tmp_path / "ds",
            workers=1, progress=False, shard_tokens=600)
    return tmp_path / "ds"


def first_shard(directory):
    return directory / json.loads((directory / "manifest.json").read_text())["shards"][0]["file"]


def test_truncated_shard(dataset_dir):
    shard = first_shard(dataset_dir)
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(ShardError, match="truncated or corrupt"):
        TokenDataset(dataset_dir)
    shard.write_bytes(data[:HEADER_BYTES - 1])
    with pytest.raises(ShardError, match="shorter than the 64-byte header"):
        TokenDataset(dataset_dir)


def test_bad_magic_and_bad_document_index(dataset_dir):
    shard = first_shard(dataset_dir)
    data = bytearray(shard.read_bytes())
    shard.write_bytes(b"XXXXXXXX" + data[8:])
    with pytest.raises(ShardError, match="bad magic"):
        TokenDataset(dataset_dir)
    offsets_end = len(data)  # no loss mask: the document index ends the file
    data[offsets_end - 16:offsets_end - 8] = np.uint64(1 << 40).tobytes()
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="document index"):
        TokenDataset(dataset_dir)


def test_swapped_shard_and_missing_shard(dataset_dir):
    files = [entry["file"] for entry in json.loads((dataset_dir / "manifest.json").read_text())["shards"]]
    assert len(files) >= 2
    last = dataset_dir / files[-1]
    shutil.copy(dataset_dir / files[0], last)  # a valid shard, but not the one the manifest lists
    with pytest.raises(ShardError, match="manifest says"):
        TokenDataset(dataset_dir)
    last.unlink()
    with pytest.raises(ShardError, match="missing"):
        TokenDataset(dataset_dir)


def test_flipped_token_is_found_by_verify(dataset_dir):
    shard = first_shard(dataset_dir)
    data = bytearray(shard.read_bytes())
    data[HEADER_BYTES] ^= 0xFF  # still a plausible file: only the checksum and the vocab check see it
    shard.write_bytes(bytes(data))
    TokenDataset(dataset_dir)
    with pytest.raises(ShardError, match="checksum"):
        TokenDataset(dataset_dir, verify=True)


def test_corrupt_manifest(dataset_dir):
    (dataset_dir / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="corrupt manifest"):
        TokenDataset(dataset_dir)


def test_vocabulary_and_tokenizer_mismatch(dataset_dir, tmp_path, tokenizer):
    vocab_size = tokenizer.get_vocab_size()
    with pytest.raises(ValueError, match=f"{vocab_size} ids but the model's vocab_size is 10"):
        open_dataset(dataset_dir, vocab_size=10)
    with pytest.raises(ValueError, match="vocab_size is 10"):
        make_loader(DataConfig(datasets=(str(dataset_dir),), seq_len=8, vocab_size=10), micro_batch_size=1)
    with pytest.raises(ValueError, match="expected"):
        open_dataset(dataset_dir, tokenizer_sha256="0" * 64)

    from tokenizers import Tokenizer

    other = Tokenizer.from_str(tokenizer.to_str())
    other.add_tokens(["extra"])
    other.save(str(tmp_path / "other.json"))
    prepare([write_jsonl(tmp_path / "b.jsonl", make_corpus(30, seed=21))], tmp_path / "other.json", tmp_path / "ds2",
            workers=1, progress=False)
    config = DataConfig(datasets=((str(dataset_dir), 1.0), (str(tmp_path / "ds2"), 1.0)), seq_len=8)
    with pytest.raises(ValueError, match="same tokenizer"):
        make_loader(config, micro_batch_size=1)


def test_config_errors_name_the_field(dataset_dir):
    with pytest.raises(ValueError, match="data.datasets.weight"):
        DataConfig(datasets=((str(dataset_dir), -1.0),))
    with pytest.raises(ValueError, match="data.seq_len"):
        DataConfig(datasets=(str(dataset_dir),), seq_len=0)
    with pytest.raises(ValueError, match="no datasets"):
        make_loader(DataConfig(), micro_batch_size=1)
    with pytest.raises(ValueError, match="validation_fraction > 0"):
        make_loader(DataConfig(datasets=(str(dataset_dir),), seq_len=8), micro_batch_size=1, split="validation")
    with pytest.raises(ValueError, match="fewer than one row"):
        make_loader(DataConfig(datasets=(str(dataset_dir),), seq_len=100_000), micro_batch_size=1)
    with pytest.raises(ValueError, match="not a multiple"):
        make_loader(DataConfig(datasets=(str(dataset_dir),), seq_len=8), micro_batch_size=3, global_batch_size=8)
