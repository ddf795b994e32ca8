"""A small world of every file fastllm reads and writes, for the bad-input tests to aim at.

Built once per test process in a temporary directory: a word-level tokenizer (and two that belong to
other models), a corpus and its prepared dataset, a recipe, a trained run directory, its fastllm
and Hugging Face conversions, a one-process checkpoint, and prepared datasets that are wrong in the
ways training must refuse. Everything is tiny, so a command on it takes milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

WORDS = [f"w{i}" for i in range(60)]
VOCAB = 64  # the model's; the tokenizer holds 62 ids

RECIPE = '''
from fastllm.data import DataConfig
from fastllm.train.config import Config, ModelSection, OptimSection, RunConfig, TrainSection


def config():
    return Config(
        run=RunConfig(dir={run!r}, progress="off"),
        model=ModelSection(preset="tiny-llama", vocab_size={vocab}, n_layers=1, max_seq_len=64),
        data=DataConfig(datasets=({data!r},), seq_len=32, prefetch=0),
        train=TrainSection(steps=2, batch_size=2, log_every=1),
        optim=OptimSection(lr=3e-3, warmup_steps=1),
    )
'''


@dataclass(frozen=True)
class World:
    root: Path
    tokenizer: Path  # the model's tokenizer.json
    other_tokenizer: Path  # same size, other words: another model's
    big_tokenizer: Path  # more ids than the model's vocab_size
    corpus: Path
    dataset: Path
    recipe: Path
    run: Path  # a trained run directory (checkpoints/step-00000002, sharded: what training writes)
    fastllm_dir: Path
    hf_dir: Path
    sharded: Path  # the run's sharded training checkpoint
    one_process: Path  # the same params as a one-process checkpoint (fastllm.checkpoint.save)
    bad_datasets: dict  # name -> a prepared dataset training must refuse
    scratch: Path  # where commands may write

    def protected(self) -> list[Path]:
        """What no bad command may change."""
        return [self.tokenizer, self.corpus, self.dataset, self.recipe, self.run, self.fastllm_dir, self.hf_dir,
                self.one_process.parent.parent]


def _train_tokenizer(words: list[str], path: Path) -> Path:
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    tokenizer.save(str(path))
    return path


def _corpus(path: Path) -> Path:
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for _ in range(120):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, rng.integers(5, 30)))}) + "\n")
    return path


def _train_run(recipe: Path) -> None:
    from fastllm.config import load_recipe
    from fastllm.train.run import train

    module, config = load_recipe(recipe)
    train(config, recipe=module, print_fn=lambda *args: None)


def _one_process_checkpoint(run: Path, target_run: Path) -> Path:
    """The run's params saved as a one-process checkpoint (``fastllm.checkpoint.save``)."""
    from fastllm import checkpoint
    from fastllm.train import checkpointing

    _, params, config = checkpointing.load_model(run)
    path = checkpointing.checkpoint_dir(target_run) / "step-00000002"
    checkpoint.save(path, {"params": params}, {"step": 2, "config": config})
    shutil.copyfile(run / "tokenizer.json", target_run / "tokenizer.json")
    return path


def _shard_dataset(path: Path, ids: list[int], tokenizer_vocab: int, max_id) -> Path:
    """A dataset written by hand (as another tool might): shard + manifest, ``max_id`` as given."""
    from fastllm.data.format import ShardWriter

    path.mkdir(parents=True)
    writer = ShardWriter(path / "shard-00000.fltok", np.dtype("<u2"))
    for start in range(0, len(ids), 40):
        writer.add(np.asarray(ids[start:start + 40]))
    entry = {"file": "shard-00000.fltok", "tokens": len(ids), "documents": writer.n_docs}
    entry["sha256"] = writer.close()
    if max_id is not None:
        entry["max_id"] = max_id
    manifest = {"format": "fastllm-tokens", "version": 1, "fingerprint": "hand-made", "documents": entry["documents"],
                "tokens": len(ids), "dtype": "uint16", "has_loss_mask": False, "shards": [entry],
                "tokenizer": {"path": "", "sha256": "0" * 64, "vocab_size": tokenizer_vocab, "eos_id": 1,
                              "eos_token": "[EOS]"}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def _bad_datasets(root: Path, world_dataset: Path, big_tokenizer: Path, corpus: Path) -> dict:
    from fastllm.data import prepare

    ids = [(7 * i) % 60 + 2 for i in range(400)]
    out_of_range = ids[:200] + [VOCAB + 5] + ids[200:]
    bad = {
        "ids over vocab (manifest)": _shard_dataset(root / "bad-manifest-max", out_of_range, 62, VOCAB + 5),
        "ids over vocab (scan)": _shard_dataset(root / "bad-scan", out_of_range, 62, None),
        "bigger tokenizer": root / "bad-big-tokenizer",
        "truncated shard": root / "bad-truncated",
        "corrupt manifest": root / "bad-manifest-json",
        "no manifest": root / "bad-no-manifest",
    }
    prepare([corpus], big_tokenizer, bad["bigger tokenizer"], workers=1, progress=False)
    shutil.copytree(world_dataset, bad["truncated shard"])
    shard = next(bad["truncated shard"].glob("shard-*"))
    shard.write_bytes(shard.read_bytes()[:-9])
    shutil.copytree(world_dataset, bad["corrupt manifest"])
    (bad["corrupt manifest"] / "manifest.json").write_text('{"format": "fastllm-tokens", "shards": [')
    shutil.copytree(world_dataset, bad["no manifest"])
    (bad["no manifest"] / "manifest.json").unlink()
    return bad


def build_world(root: Path) -> World:
    from fastllm import hf
    from fastllm.data import prepare

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(WORDS, root / "tokenizer.json")
    other = _train_tokenizer([f"v{i}" for i in range(60)], root / "other-tokenizer.json")
    big = _train_tokenizer([f"w{i}" for i in range(90)], root / "big-tokenizer.json")
    corpus = _corpus(root / "corpus.jsonl")
    dataset = root / "data"
    prepare([corpus], tokenizer, dataset, workers=1, progress=False)
    run = root / "run"
    recipe = root / "recipe.py"
    recipe.write_text(RECIPE.format(run=str(run), vocab=VOCAB, data=str(dataset)))
    _train_run(recipe)
    hf.convert(run, root / "fastllm-model", to="fastllm")
    hf.convert(run, root / "hf-model", to="hf")
    from fastllm.train import checkpointing

    one_process = _one_process_checkpoint(run, root / "one-process-run")
    scratch = root / "scratch"
    scratch.mkdir()
    return World(root, tokenizer, other, big, corpus, dataset, recipe, run, root / "fastllm-model",
                 root / "hf-model", checkpointing.latest(run), one_process, _bad_datasets(root, dataset, big, corpus),
                 scratch)


def snapshot(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under ``paths`` (and the set of names): what "unchanged" means."""
    found = {}
    for top in paths:
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for file in files:
            found[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


DRIVER = Path(__file__).with_name("cli_driver.py")


def run_commands(world: World, argvs: list[list[str]], timeout: float = 20.0, cwd: Path | None = None) -> list[dict]:
    """Every argv through ``fastllm`` in one driver process started in ``cwd`` (default: the world's
    scratch directory)."""
    import os
    import subprocess
    import sys

    # as a user runs it: without the test suite's runtime type checks (which turn some bad values
    # into a jaxtyping error before fastllm's own check sees them)
    # and with Python's bytecode caches on, so a stray __pycache__ write shows
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "FASTLLM_TYPECHECK": "0"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    done = subprocess.run([sys.executable, str(DRIVER), "--timeout", str(timeout)], input=json.dumps(argvs),
                          capture_output=True, text=True, cwd=cwd or world.scratch, env=env,
                          timeout=timeout * len(argvs) + 60)
    assert done.returncode == 0, f"the driver failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)
