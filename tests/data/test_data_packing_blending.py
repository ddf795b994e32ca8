"""Packing keeps every token and every document boundary; blending hits its weights exactly."""

import json

import numpy as np
import pytest

from data_helpers import write_jsonl
from fastllm import random
from fastllm.data import IGNORE_INDEX, Blend, PackedSequences, TokenDataset, prepare


def packed(path, seq_len=16, **options):
    dataset = TokenDataset(path)
    return PackedSequences(dataset, np.arange(len(dataset)), seq_len, random.key(3), **options)


def epoch_stream(sequences, epoch=0):
    order, _ = sequences._epoch(epoch)
    docs = [sequences.dataset.document(int(sequences.doc_ids[i]))[: sequences.lengths[i]] for i in order]
    segment = np.concatenate([np.full(len(d), k) for k, d in enumerate(docs)])
    return np.concatenate(docs).astype(np.int64), segment


def test_rows_tile_the_shuffled_document_stream(prepared_datasets):
    sequences = packed(prepared_datasets[0], seq_len=16)
    stream, doc_of = epoch_stream(sequences)
    eos = sequences.dataset.eos_id
    for r in range(sequences.rows_per_epoch):
        row = sequences.row(r)
        window = slice(16 * r, 16 * r + 17)
        assert np.array_equal(row["tokens"], stream[window][:-1])
        assert np.array_equal(row["targets"], stream[window][1:])  # nothing masked by default
        docs = doc_of[window][:-1]
        assert np.array_equal(row["segment_ids"], docs - docs[0])
        starts = np.flatnonzero(np.diff(docs)) + 1  # positions restart at each document start
        assert row["positions"][0] == 0 and np.all(row["positions"][starts] == 0)
        assert np.all(np.diff(row["positions"])[np.diff(docs) == 0] == 1)
        assert np.all(row["tokens"][starts - 1] == eos)  # every document ends with EOS
    # Rows of the next epoch come in another order: still the same multiset of documents.
    assert not np.array_equal(sequences._epoch(1)[0], sequences._epoch(0)[0])
    assert np.array_equal(sequences.row(sequences.rows_per_epoch)["tokens"], epoch_stream(sequences, 1)[0][:16])


def test_cross_document_targets_can_be_masked(prepared_datasets):
    plain = packed(prepared_datasets[0], mask_cross_document_loss=False)
    masked = packed(prepared_datasets[0], mask_cross_document_loss=True)
    crossed = 0
    for r in range(40):
        a, b = plain.row(r), masked.row(r)
        crossing = np.append(np.diff(a["segment_ids"]) != 0, False)
        ignored = b["targets"] == IGNORE_INDEX
        # The last target of a row may cross too; it is ignored iff the stream's next token starts a document.
        assert np.array_equal(ignored[:-1], crossing[:-1])
        assert np.array_equal(b["targets"][~ignored], a["targets"][~ignored])
        assert np.all(a["tokens"][ignored] == plain.dataset.eos_id)
        crossed += int(ignored.sum())
    assert crossed > 0


def test_truncation_caps_documents(prepared_datasets):
    split = packed(prepared_datasets[0], seq_len=8, split_long_documents=True)
    truncated = packed(prepared_datasets[0], seq_len=8, split_long_documents=False)
    assert split.lengths.max() > 8 and truncated.lengths.max() == 8
    assert truncated.rows_per_epoch < split.rows_per_epoch
    for r in range(50):
        assert np.bincount(truncated.row(r)["segment_ids"]).max() <= 8


def test_sft_rows_ignore_prompt_targets(tmp_path, tokenizer_file):
    records = [{"prompt": " ".join(f"w{i}" for i in range(p)), "response": f"w{50 + p} w51"} for p in range(1, 9)]
    with open(tmp_path / "sft.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    prepare([tmp_path / "sft.jsonl"], tokenizer_file, tmp_path / "sft", prompt_field="prompt",
            response_field="response", workers=1, progress=False)
    sequences = packed(tmp_path / "sft", seq_len=12)
    order, ends = sequences._epoch(0)
    masks = np.concatenate([sequences.dataset.loss_mask(int(i)) for i in order])
    for r in range(sequences.rows_per_epoch):
        targets = sequences.row(r)["targets"]
        assert np.array_equal(targets != IGNORE_INDEX, masks[12 * r + 1: 12 * r + 13] == 1)


def test_blend_proportions_order_and_indices():
    weights = [0.5, 0.3, 0.2]
    blend = Blend(weights, random.key(7))
    datasets, within = blend.locate(np.arange(100_000))
    shares = np.bincount(datasets, minlength=3) / 100_000
    assert np.all(np.abs(shares - weights) < 0.01 * np.asarray(weights))
    for d in range(3):  # each dataset's samples are taken in order 0, 1, 2, ...: none skipped or repeated
        assert np.array_equal(within[datasets == d], np.arange(np.sum(datasets == d)))
    again = Blend(weights, random.key(7)).locate(np.arange(100_000))
    assert np.array_equal(again[0], datasets) and np.array_equal(again[1], within)
    other = Blend(weights, random.key(8)).locate(np.arange(100_000))[0]
    assert not np.array_equal(other, datasets)
    # Random access agrees with the sequential stream.
    picks = np.array([99_999, 5, 4096, 4095, 50_123])
    assert np.array_equal(blend.locate(picks)[0], datasets[picks])
    assert np.array_equal(blend.locate(picks)[1], within[picks])


def test_blend_is_exact_in_expectation_and_within_one_sample():
    weights = np.array([0.61, 0.27, 0.12])
    samples = 1000 * 4096
    counts = np.array([Blend(weights, random.key(seed)).counts_before(1000) for seed in range(200)])
    assert np.all(counts.sum(axis=1) == samples)
    assert np.all(np.abs(counts - weights * samples) < 1)
    assert np.allclose(counts.mean(axis=0), weights * samples, atol=0.15)


def test_tiny_weights_get_a_larger_block():
    blend = Blend([1.0, 1e-4], random.key(0))
    assert blend.block_size >= 20_000
    datasets, _ = blend.locate(np.arange(blend.block_size * 3))
    assert np.sum(datasets == 1) in (5, 6, 7)
    with pytest.raises(ValueError, match="positive"):
        Blend([1.0, 0.0], random.key(0))
