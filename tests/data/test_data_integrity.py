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


def test_manifest_records_each_shards_largest_id(dataset_dir):
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    for entry in manifest["shards"]:
        shard = TokenDataset(dataset_dir).shards[manifest["shards"].index(entry)]
        assert entry["max_id"] == int(shard.tokens.max())


def test_ids_beyond_the_models_vocabulary_are_refused_on_open(dataset_dir):
    """By the manifest's largest id (no data read), or by a scan when the manifest has none; also
    when the recorded tokenizer size understates the ids (a hand-written manifest, another tool's)."""
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    largest = max(entry["max_id"] for entry in manifest["shards"])
    manifest["tokenizer"]["vocab_size"] = largest  # passes the tokenizer-size check below
    (dataset_dir / "manifest.json").write_text(json.dumps(manifest))
    open_dataset(dataset_dir, vocab_size=largest + 1)
    with pytest.raises(ShardError, match=f"holds token id {largest}, but the model's vocab_size is {largest}"):
        open_dataset(dataset_dir, vocab_size=largest)
    for entry in manifest["shards"]:
        del entry["max_id"]  # a manifest written before max_id, or by another tool: scanned
    (dataset_dir / "manifest.json").write_text(json.dumps(manifest))
    open_dataset(dataset_dir, vocab_size=largest + 1)
    with pytest.raises(ShardError, match=f"holds token id {largest}"):
        open_dataset(dataset_dir, vocab_size=largest)


def test_an_id_changed_after_prepare_is_refused_when_its_row_is_read(dataset_dir, tokenizer):
    shard = first_shard(dataset_dir)
    data = bytearray(shard.read_bytes())
    data[HEADER_BYTES + 1] = 0x7F  # token 0 becomes >= 32512, the manifest's max_id still small
    shard.write_bytes(bytes(data))
    vocab = tokenizer.get_vocab_size()
    loader = make_loader(DataConfig(datasets=(str(dataset_dir),), seq_len=8, vocab_size=vocab, prefetch=0),
                         micro_batch_size=4)
    with pytest.raises(ShardError, match=f"holds token id .*, but the model's vocab_size is {vocab}"):
        for _ in range(500):  # an epoch of rows, whatever their order
            next(loader)


def test_bad_input_leaves_the_dataset_that_was_there(dataset_dir, tmp_path, tokenizer_file):
    from fastllm.errors import UserError

    before = {p.name: p.read_bytes() for p in dataset_dir.iterdir()}
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "w1"}\n\xff\xfe\n')
    with pytest.raises(UserError, match="bad.jsonl:2: not UTF-8 text"):
        prepare([tmp_path / "bad.jsonl"], tokenizer_file, dataset_dir, workers=1, progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in dataset_dir.iterdir()} == before
