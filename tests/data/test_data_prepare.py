"""prepare: every input kind round-trips to the tokenizer's ids; reruns, interruptions, bad input."""

import json
import os

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from data_helpers import expected_ids, make_corpus, write_jsonl
from fastllm.data import TokenDataset, open_dataset, prepare
from fastllm.data import format as shard_format
from fastllm.data.cli import main as cli_main
from fastllm.errors import UserError

EOS = 1  # "[EOS]" is the second special token of the fixture tokenizer


def documents(path) -> list[list[int]]:
    dataset = TokenDataset(path)
    return [dataset.document(i).tolist() for i in range(len(dataset))]


def test_jsonl_round_trip_in_parallel_workers_and_many_shards(tmp_path, tokenizer_file, tokenizer):
    texts = make_corpus(300, seed=1) + [""]  # the empty text is skipped, not a document
    source = write_jsonl(tmp_path / "a.jsonl", texts)
    manifest = prepare([source], tokenizer_file, tmp_path / "out", workers=2, shard_tokens=1500,
                       batch_docs=16, progress=False)
    assert len(manifest["shards"]) > 3 and manifest["skipped_empty"] == 1
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["eos_id"] == EOS
    want = expected_ids(tokenizer, texts, EOS)
    assert documents(tmp_path / "out") == want
    assert manifest["tokens"] == sum(len(d) for d in want) and manifest["documents"] == len(want)


def test_parquet_text_and_datasets_directory_round_trip(tmp_path, tokenizer_file, tokenizer):
    import pyarrow as pa  # the integrator adds pyarrow to the test extra
    import pyarrow.parquet as pq

    texts = make_corpus(40, seed=2)
    pq.write_table(pa.table({"body": texts, "n": list(range(40))}), tmp_path / "a.parquet", row_group_size=16)
    prepare([tmp_path / "a.parquet"], tokenizer_file, tmp_path / "pq", text_field="body", workers=1, progress=False)
    assert documents(tmp_path / "pq") == expected_ids(tokenizer, texts, EOS)

    # A datasets save_to_disk directory: Arrow IPC stream files listed by state.json.
    hf = tmp_path / "hf"
    hf.mkdir()
    for index, part in enumerate((texts[:25], texts[25:])):
        with pa.OSFile(str(hf / f"data-0000{index}-of-00002.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, pa.schema([("text", pa.string())])) as writer:
                writer.write_table(pa.table({"text": part}))
    (hf / "dataset_info.json").write_text("{}")
    (hf / "state.json").write_text(json.dumps({"_data_files": [
        {"filename": "data-00000-of-00002.arrow"}, {"filename": "data-00001-of-00002.arrow"}]}))
    prepare([hf], tokenizer_file, tmp_path / "hf_out", workers=1, progress=False)
    assert documents(tmp_path / "hf_out") == expected_ids(tokenizer, texts, EOS)

    (tmp_path / "txt").mkdir()
    for index, text in enumerate(texts[:5]):
        (tmp_path / "txt" / f"{index}.txt").write_text(text)
    prepare([tmp_path / "txt"], tokenizer_file, tmp_path / "txt_out", workers=1, progress=False)
    assert documents(tmp_path / "txt_out") == expected_ids(tokenizer, texts[:5], EOS)
    (tmp_path / "lines.txt").write_text("\n".join(texts[:7]) + "\n")
    prepare([tmp_path / "lines.txt"], tokenizer_file, tmp_path / "lines_out", text_mode="line", workers=1,
            progress=False)
    assert documents(tmp_path / "lines_out") == expected_ids(tokenizer, texts[:7], EOS)


def test_transformers_tokenizer_directory(tmp_path, tokenizer):
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="[EOS]", unk_token="[UNK]")
    wrapped.save_pretrained(tmp_path / "tok")
    texts = make_corpus(20, seed=3)
    manifest = prepare([write_jsonl(tmp_path / "a.jsonl", texts)], tmp_path / "tok", tmp_path / "out",
                       workers=1, progress=False)
    assert manifest["tokenizer"]["eos_token"] == "[EOS]"
    assert documents(tmp_path / "out") == [wrapped.encode(t, add_special_tokens=False) + [EOS] for t in texts]


def test_large_vocabulary_uses_uint32(tmp_path):
    vocab = {"[UNK]": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    texts = ["w69999 w0 w65536", "w65535 w12"]
    manifest = prepare([write_jsonl(tmp_path / "a.jsonl", texts)], tmp_path / "tokenizer.json", tmp_path / "out",
                       workers=1, progress=False)
    assert manifest["dtype"] == "uint32"
    assert documents(tmp_path / "out") == [[70001, 2, 65538, 1], [65537, 14, 1]]


def test_rerun_is_idempotent_and_other_inputs_need_overwrite(tmp_path, tokenizer_file):
    source = write_jsonl(tmp_path / "a.jsonl", make_corpus(50, seed=4))
    first = prepare([source], tokenizer_file, tmp_path / "out", workers=1, progress=False)
    shard = tmp_path / "out" / first["shards"][0]["file"]
    stamp = os.stat(shard).st_mtime_ns
    assert prepare([source], tokenizer_file, tmp_path / "out", workers=1, progress=False) == first
    assert os.stat(shard).st_mtime_ns == stamp  # nothing rewritten
    other = write_jsonl(tmp_path / "b.jsonl", make_corpus(10, seed=5))
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare([other], tokenizer_file, tmp_path / "out", workers=1, progress=False)
    assert prepare([other], tokenizer_file, tmp_path / "out", workers=1, progress=False,
                   overwrite=True)["documents"] == 10


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, tokenizer_file, monkeypatch):
    source = write_jsonl(tmp_path / "a.jsonl", make_corpus(200, seed=6))
    real_add, calls = shard_format.ShardWriter.add, []

    def add_then_die(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 150:
            raise KeyboardInterrupt
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(shard_format.ShardWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare([source], tokenizer_file, tmp_path / "out", workers=1, progress=False, shard_tokens=800)
    monkeypatch.undo()
    assert not (tmp_path / "out").exists()  # shards were staged; the directory it created is gone too
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        open_dataset(tmp_path / "out")
    manifest = prepare([source], tokenizer_file, tmp_path / "out", workers=1, progress=False, shard_tokens=800)
    assert len(TokenDataset(tmp_path / "out")) == manifest["documents"] == 200


def test_unfinished_shard_file_is_rejected(tmp_path):
    writer = shard_format.ShardWriter(tmp_path / "s.fltok", np.dtype("uint16"))
    writer.add(np.arange(100_000) % 1000)  # more than the write buffer, so bytes reach the file
    with pytest.raises(shard_format.ShardError, match="bad magic"):
        shard_format.open_shard(tmp_path / "s.fltok.partial")  # header is written last
    writer.abort()
    assert not list(tmp_path.iterdir())


def test_sft_prompt_tokens_are_masked(tmp_path, tokenizer_file, tokenizer):
    records = [{"prompt": "w1 w2 w3", "response": "w4 w5"}, {"prompt": "w6", "response": "w7 w8 w9"}]
    with open(tmp_path / "sft.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    prepare([tmp_path / "sft.jsonl"], tokenizer_file, tmp_path / "out", prompt_field="prompt",
            response_field="response", workers=1, progress=False)
    dataset = TokenDataset(tmp_path / "out")
    for index, record in enumerate(records):
        prompt, response = (tokenizer.encode(record[k], add_special_tokens=False).ids for k in ("prompt", "response"))
        assert dataset.document(index).tolist() == prompt + response + [EOS]
        assert dataset.loss_mask(index).tolist() == [0] * len(prompt) + [1] * (len(response) + 1)


def test_bad_inputs_give_clear_errors(tmp_path, tokenizer_file):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no documents"):
        prepare([tmp_path / "empty.jsonl"], tokenizer_file, tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    write_jsonl(tmp_path / "blank.jsonl", ["", ""])
    with pytest.raises(ValueError, match="no documents"):
        prepare([tmp_path / "blank.jsonl"], tokenizer_file, tmp_path / "out", workers=1, progress=False)
    write_jsonl(tmp_path / "other.jsonl", ["w1"], field="content")
    with pytest.raises(UserError, match="'text'.*content"):
        prepare([tmp_path / "other.jsonl"], tokenizer_file, tmp_path / "out", workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        prepare([tmp_path / "missing.jsonl"], tokenizer_file, tmp_path / "out", workers=1, progress=False)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no input files"):
        prepare([tmp_path / "empty_dir"], tokenizer_file, tmp_path / "out", workers=1, progress=False)
    with pytest.raises(ValueError, match="no end-of-sequence token"):
        prepare([tmp_path / "other.jsonl"], tokenizer_file, tmp_path / "out", eos_token="<nope>", workers=1)


def test_cli(tmp_path, tokenizer_file, capsys):
    source = write_jsonl(tmp_path / "a.jsonl", make_corpus(30, seed=7))
    assert cli_main([str(source), "--tokenizer", str(tokenizer_file), "--output", str(tmp_path / "out"),
                     "--workers", "1", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["documents"] == 30 and summary["shards"] == 1
    assert cli_main([str(tmp_path / "nope.jsonl"), "--tokenizer", str(tokenizer_file), "--output",
                     str(tmp_path / "x")]) == 2
    assert "input not found" in capsys.readouterr().err
