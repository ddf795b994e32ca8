"""Every bad input issue 14 lists (cryptic tracebacks, silently accepted values), and its neighbours:
one line on stderr naming what is wrong, exit status 2, no traceback, nothing protected changed.

All rows run through the real ``fastllm`` entry point in one driver process (see cli_driver.py).
"""

from __future__ import annotations

from cli_world import VOCAB, World, run_commands, snapshot

GEN = ["--prompt", "w1 w2", "--max-new-tokens", "3"]


def _files(world: World) -> dict:
    """Bad files in the scratch directory, written once."""
    s = world.scratch
    files = {
        "binary.jsonl": b"\xff\xfe\x00\x01binary", "binary.txt": b"ok line\n\xc3\x28 bad\n",
        "bad-json.jsonl": b'{"text": "w1"}\n{"text": \n', "no-text.jsonl": b'{"body": "w1 w2"}\n',
        "not-a-string.jsonl": b'{"text": 5}\n', "array.jsonl": b'[1, 2]\n', "empty.jsonl": b"",
        "junk.jsonl.gz": b"not gzip at all", "junk.parquet": b"PAR1 truncated", "data.csv": b"a,b\n",
        "not-a-tokenizer.json": b'{"hello": 1}', "binary-tokenizer.json": b"\x00\x01\x02\xff",
        "recipe-syntax.py": b"def config(:\n", "recipe-none.py": b"x = 1\n",
        "recipe-raises.py": b"from fastllm.train.config import TrainSection\n\ndef config():\n"
                            b"    return TrainSection(steps=-3)\n",
        "recipe-wrong-type.py": b"def config():\n    return {'train': {}}\n",
    }
    for name, data in files.items():
        (s / name).write_bytes(data)
    for name in ("empty-dir", "hf-junk", "hf-array", "hf-bert", "hf-strings", "fastllm-junk", "fastllm-array",
                 "step-00000009", "run-empty/checkpoints"):
        (s / name).mkdir(parents=True, exist_ok=True)
    (s / "hf-junk" / "config.json").write_bytes(b"\x00\xff not json")
    (s / "hf-array" / "config.json").write_text("[1, 2]")
    (s / "hf-bert" / "config.json").write_text('{"model_type": "bert"}')
    (s / "hf-strings" / "config.json").write_text('{"model_type": "llama", "hidden_size": "big"}')
    (s / "fastllm-junk" / "fastllm.json").write_text('{"format": "fastllm-model", "version": 1, "config": 3}')
    (s / "fastllm-array" / "fastllm.json").write_text('["found by the fuzz test"]')
    (s / "step-00000009" / "metadata.json").write_text("{}")
    truncated = s / "truncated-hf"
    truncated.mkdir(exist_ok=True)
    (truncated / "config.json").write_bytes((world.hf_dir / "config.json").read_bytes())
    (truncated / "model.safetensors").write_bytes((world.hf_dir / "model.safetensors").read_bytes()[:300])
    return {name: str(s / name) for name in [*files, "empty-dir", "hf-junk", "hf-array", "hf-bert", "hf-strings",
                                               "fastllm-junk", "fastllm-array", "step-00000009", "run-empty",
                                               "truncated-hf"]}


def _rows(w: World, f: dict) -> list[tuple[str, list[str], str]]:
    tok, run, recipe = str(w.tokenizer), str(w.run), str(w.recipe)
    prep = ["--tokenizer", tok, "--output", str(w.scratch / "out"), "--workers", "1", "--quiet"]

    def train(*overrides):
        return ["train", recipe, *overrides]

    return [
        # --- issue 14: cryptic ---
        ("prepare non-UTF-8 JSONL", ["prepare", f["binary.jsonl"], *prep], "binary.jsonl:1: not UTF-8 text"),
        ("prepare non-UTF-8 text line", ["prepare", f["binary.txt"], *prep], "binary.txt: not UTF-8 text"),
        ("prepare tokenizer is JSONL", ["prepare", str(w.corpus), "--tokenizer", str(w.corpus),
                                        *prep[2:]], "corpus.jsonl: not a tokenizers tokenizer.json"),
        ("prepare tokenizer is other JSON", ["prepare", str(w.corpus), "--tokenizer", f["not-a-tokenizer.json"],
                                             *prep[2:]], "not-a-tokenizer.json: not a tokenizers tokenizer.json"),
        ("generate --top-k 0", ["generate", run, *GEN, "--temperature", "1", "--top-k", "0"],
         "argument --top-k: expected an integer >= 1, got '0'"),
        ("generate --top-p 0", ["generate", run, *GEN, "--temperature", "1", "--top-p", "0"],
         "argument --top-p: expected a probability in (0, 1], got '0'"),
        ("prepare missing input", ["prepare", str(w.scratch / "nope.jsonl"), *prep], "input not found: "),
        # --- issue 14: silently accepted ---
        ("optim.eps=inf", train("--print-config", "optim.eps=inf"), "optim.eps='inf': expected a finite number"),
        ("optim.lr=nan", train("--print-config", "optim.lr=nan"), "optim.lr='nan': expected a finite number"),
        ("ids over vocab (manifest)", train(f"data.datasets={w.bad_datasets['ids over vocab (manifest)']}"),
         f"holds token id {VOCAB + 5}, but the model's vocab_size is {VOCAB}"),
        ("ids over vocab (scan)", train(f"data.datasets={w.bad_datasets['ids over vocab (scan)']}"),
         f"holds token id {VOCAB + 5}, but the model's vocab_size is {VOCAB}"),
        ("generate --temperature -1", ["generate", run, *GEN, "--temperature", "-1"],
         "argument --temperature: expected a finite number >= 0"),
        ("generate --top-p 2", ["generate", run, *GEN, "--temperature", "1", "--top-p", "2"],
         "argument --top-p: expected a probability in (0, 1], got '2'"),
        ("generate --max-new-tokens -5", ["generate", run, "--prompt", "w1", "--max-new-tokens", "-5"],
         "argument --max-new-tokens: expected an integer >= 1, got '-5'"),
        ("generate empty prompt", ["generate", run, "--prompt", ""], "argument --prompt: expected a non-empty prompt"),
        ("generate other vocabulary", ["generate", run, *GEN, "--tokenizer", str(w.other_tokenizer)],
         "its vocabulary differs from"),
        ("generate bigger vocabulary", ["generate", str(w.sharded), *GEN, "--tokenizer", str(w.big_tokenizer)],
         "its vocabulary differs from"),
        ("convert onto a fastllm dir", ["convert", run, str(w.fastllm_dir), "--to", "fastllm"],
         "already exists and is not an empty directory"),
        # --- neighbours: prepare ---
        ("prepare bad JSON line", ["prepare", f["bad-json.jsonl"], *prep], "bad-json.jsonl:2: invalid JSON"),
        ("prepare missing field", ["prepare", f["no-text.jsonl"], *prep], "no field 'text' (fields present: ['body'])"),
        ("prepare non-string field", ["prepare", f["not-a-string.jsonl"], *prep], "field 'text' must be a string"),
        ("prepare JSON array line", ["prepare", f["array.jsonl"], *prep], "expected a JSON object per line"),
        ("prepare empty input", ["prepare", f["empty.jsonl"], *prep], "no documents in"),
        ("prepare junk gzip", ["prepare", f["junk.jsonl.gz"], *prep], "junk.jsonl.gz: truncated or corrupt gzip"),
        ("prepare junk parquet", ["prepare", f["junk.parquet"], *prep], "junk.parquet: not a readable parquet file"),
        ("prepare unsupported type", ["prepare", f["data.csv"], *prep], "data.csv: unsupported input type"),
        ("prepare empty directory", ["prepare", f["empty-dir"], *prep], "no input files found"),
        ("prepare binary tokenizer", ["prepare", str(w.corpus), "--tokenizer", f["binary-tokenizer.json"], *prep[2:]],
         "binary-tokenizer.json: not a tokenizers tokenizer.json"),
        ("prepare EOS not in vocab", ["prepare", str(w.corpus), *prep, "--eos-token", "<nope>"],
         "no end-of-sequence token ('<nope>' is not in its vocabulary)"),
        ("prepare --workers 0", ["prepare", str(w.corpus), *prep[:-3], "--workers", "0"],
         "argument --workers: expected an integer >= 1"),
        ("prepare prompt without response", ["prepare", str(w.corpus), *prep, "--prompt-field", "p"],
         "prompt_field and response_field go together"),
        ("prepare onto another dataset", ["prepare", f["bad-json.jsonl"], "--tokenizer", tok, "--output",
                                          str(w.dataset), "--workers", "1", "--quiet"], "holds a dataset prepared"),
        ("prepare onto another dataset, overwrite", ["prepare", str(w.corpus), f["binary.jsonl"], "--tokenizer", tok,
                                                     "--output", str(w.dataset), "--overwrite", "--workers", "1",
                                                     "--quiet"], "binary.jsonl:1: not UTF-8 text"),
        ("prepare output is a file", ["prepare", str(w.corpus), "--tokenizer", tok, "--output", str(w.corpus),
                                      "--workers", "1", "--quiet"], "corpus.jsonl: File exists"),
        # --- neighbours: convert and generate sources ---
        ("convert missing source", ["convert", str(w.scratch / "nope"), str(w.scratch / "o1")], "nope: does not exist"),
        ("convert a file", ["convert", str(w.corpus), str(w.scratch / "o1")], "corpus.jsonl: is a file"),
        ("convert an empty dir", ["convert", f["empty-dir"], str(w.scratch / "o1")],
         "empty-dir: not a model directory"),
        ("convert binary config.json", ["convert", f["hf-junk"], str(w.scratch / "o1")],
         "config.json: not a Hugging Face config (invalid JSON"),
        ("convert config.json array", ["convert", f["hf-array"], str(w.scratch / "o1")],
         "config.json: not a Hugging Face config (expected a JSON object, got list)"),
        ("convert unsupported model_type", ["convert", f["hf-bert"], str(w.scratch / "o1")],
         "unsupported model_type = 'bert'"),
        ("convert mistyped field", ["convert", f["hf-strings"], str(w.scratch / "o1")],
         "hidden_size must be a int (like 4096), got 'big'"),
        ("convert truncated safetensors", ["convert", f["truncated-hf"], str(w.scratch / "o1")],
         "model.safetensors: cannot read safetensors"),
        ("convert fastllm.json wrong schema", ["convert", f["fastllm-junk"], str(w.scratch / "o1")],
         "config: expected a mapping, got int"),
        ("generate fastllm.json array", ["generate", f["fastllm-array"], *GEN],
         "fastllm.json: not a fastllm model header (expected a JSON object, got list)"),
        ("convert incomplete checkpoint", ["convert", f["step-00000009"], str(w.scratch / "o1")],
         "is incomplete: no COMPLETE marker"),
        ("convert run without checkpoint", ["convert", f["run-empty"], str(w.scratch / "o1")],
         "a training run directory without a complete checkpoint"),
        ("convert onto the run dir", ["convert", str(w.hf_dir), run], "already exists and is not an empty directory"),
        ("convert --max-shard-bytes 0", ["convert", run, str(w.scratch / "o1"), "--max-shard-bytes", "0"],
         "argument --max-shard-bytes: expected an integer >= 1"),
        ("generate junk source", ["generate", f["hf-junk"], *GEN], "not a Hugging Face config"),
        ("generate no tokenizer", ["generate", f["truncated-hf"], *GEN], "cannot read safetensors"),
        ("generate tokenizer is binary", ["generate", run, *GEN, "--tokenizer", f["binary-tokenizer.json"]],
         "not a tokenizers tokenizer.json"),
        ("generate --temperature nan", ["generate", run, *GEN, "--temperature", "nan"],
         "argument --temperature: expected a finite number >= 0"),
        ("generate too many new tokens", ["generate", run, "--prompt", "w1", "--max-new-tokens", "64"],
         "max_new_tokens must be in [1, 63]"),
        ("generate --device", ["generate", run, *GEN, "--device", "tpu"], "argument --device: expected cpu, cuda"),
        # --- neighbours: train config ---
        ("train missing recipe", ["train", str(w.scratch / "nope.py")], "does not exist"),
        ("train recipe syntax", ["train", f["recipe-syntax.py"]], "recipe-syntax.py', line 1: "),
        ("train recipe without config()", ["train", f["recipe-none.py"]], "must define a function config()"),
        ("train recipe invalid config", ["train", f["recipe-raises.py"]],
         "line 4: ValueError: train.steps: must be > 0"),
        ("train recipe wrong type", ["train", f["recipe-wrong-type.py"]], "config() returned a dict"),
        ("train unknown key", train("--print-config", "train.stepz=3"), "unknown config key 'train.stepz'"),
        ("train malformed override", train("--print-config", "train.steps"), "must look like key.sub=value"),
        ("train section as value", train("--print-config", "optim=3"), "is a section, not a value"),
        ("train bigger tokenizer", train(f"data.datasets={w.bad_datasets['bigger tokenizer']}"),
         "prepared with a tokenizer of 92 ids but the model's vocab_size is 64"),
        ("train truncated shard", train(f"data.datasets={w.bad_datasets['truncated shard']}"), "truncated or corrupt"),
        ("train corrupt manifest", train(f"data.datasets={w.bad_datasets['corrupt manifest']}"), "corrupt manifest"),
        ("train no manifest", train(f"data.datasets={w.bad_datasets['no manifest']}"), "no manifest.json"),
    ]


def test_each_bad_input_is_one_line_naming_it(world):
    files = _files(world)
    rows = _rows(world, files)
    before = snapshot(world.protected())
    results = run_commands(world, [argv for _, argv, _ in rows])
    failures = []
    for (name, argv, expected), result in zip(rows, results):
        lines = result["stderr"].strip().splitlines()
        ok = (result["code"] == 2 and len(lines) == 1 and "Traceback" not in result["stderr"]
              and expected in lines[0] and lines[0].startswith("fastllm"))
        if not ok:
            failures.append(f"{name}: exit {result['code']}, expected {expected!r} in one line, got:\n"
                            f"{result['stderr'][-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert snapshot(world.protected()) == before, "a bad command changed a file it must not touch"
    assert not (world.scratch / "out").exists() and not (world.scratch / "o1").exists()
