"""A tiny training world for the lifecycle tests, and ways to run, signal and kill ``fastllm train``.

The recipe trains a one-block Llama of vocabulary 64 on a word-level corpus (milliseconds a step).
Its own ``model(config)`` wraps the built-in decoder so that a test can make chosen training steps'
loss NaN (``bad``), each step slower (``step_sleep``, so a signal lands mid-run) or the start-up
long (``sleep_before``: ``before_train`` leaves a ``started`` file in the run directory and sleeps,
with the stop signals already taken over). Nothing of this touches the numbers otherwise: a run
of this recipe equals a run of the built-in decoder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cli_world import WORDS, _corpus, _train_tokenizer

VOCAB = 64
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "FASTLLM_TYPECHECK": "0"}

RECIPE = '''
import dataclasses, os, time
from pathlib import Path

import torch

from fastllm import models
from fastllm.data import DataConfig
from fastllm.train.config import Config, ModelSection, OptimSection, RunConfig, TrainSection

BAD = {bad!r}  # training steps (1-based, counted by this process) whose loss is NaN
BAD_RANK = {bad_rank!r}  # only on this rank (None: every rank)
STEP_SLEEP, SLEEP_BEFORE = {step_sleep!r}, {sleep_before!r}


def config():
    return Config(
        run=RunConfig(dir="runs/lifecycle", progress="off", timeout_s=30.0),
        model=ModelSection(preset="tiny-llama", vocab_size={vocab}, n_layers=1, max_seq_len=64),
        data=DataConfig(datasets=({data!r},), seq_len=32, prefetch=2),
        train=TrainSection(steps=6, batch_size=2, log_every=1, checkpoint_every=2, checkpoint_minutes=0.0),
        optim=OptimSection(lr=3e-3, warmup_steps=1),
    )


def before_train(config):
    if SLEEP_BEFORE:
        Path(config.run.dir).mkdir(parents=True, exist_ok=True)
        (Path(config.run.dir) / "started").touch()
        time.sleep(SLEEP_BEFORE)
    return config


def model(config):
    base = models.model(config.model_config)
    head, calls = base.parts[-1], [0]

    def head_fn(static, params, carry, batch, layout):
        out = head.fn(static, params, carry, batch, layout)
        if torch.is_grad_enabled():  # a training step, not validation
            calls[0] += 1
            time.sleep(STEP_SLEEP)
            if calls[0] in BAD and BAD_RANK in (None, int(os.environ.get("RANK", "0"))):
                out = {{**out, "loss": out["loss"] * float("nan")}}
        return out

    return dataclasses.replace(base, parts=[*base.parts[:-1], dataclasses.replace(head, fn=head_fn)])
'''


def build_dataset(root: Path) -> Path:
    from fastllm.data import prepare

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(WORDS, root / "tokenizer.json")
    corpus = _corpus(root / "corpus.jsonl")
    prepare([corpus], tokenizer, root / "data", workers=1, progress=False)
    return root / "data"


def write_recipe(path: Path, data: Path, *, bad=(), bad_rank=None, step_sleep: float = 0.0,
                 sleep_before: float = 0.0) -> Path:
    path.write_text(RECIPE.format(bad=sorted(bad), bad_rank=bad_rank, step_sleep=step_sleep, sleep_before=sleep_before,
                                  vocab=VOCAB, data=str(data)))
    return path


def train_command(recipe: Path, run_dir: Path, *overrides: str, ranks: int = 1) -> list[str]:
    args = ["-m", "fastllm", "train", str(recipe), f"run.dir={run_dir}", *overrides]
    if ranks == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *args,
            f"mesh.data={ranks}"]


class Launch:
    """A ``fastllm train`` process (or torchrun with its workers) started in the background."""

    def __init__(self, command: list[str], log: Path):
        self.log, self.started = log, time.monotonic()
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=ENV,
                                            start_new_session=True)

    def wait(self, timeout: float = 120.0) -> int:
        return self.process.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self) -> None:
        """Kill it (and torchrun's workers) if it still runs: a failed test leaves nothing behind."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def rank_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of torchrun's workers (its children with ``RANK`` in their environment)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        ranks = [int(v[5:]) for v in environ if v.startswith(b"RANK=")]
        if parent == launcher and ranks:
            found[ranks[0]] = int(entry)
    return found


def run(command: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout)


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, what: str = "a condition",
             interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def logged_steps(run_dir: Path) -> int:
    """Lines of metrics.jsonl so far (0 when there is none)."""
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def training(run_dir: Path) -> list[tuple]:
    """(step, loss, grad_norm, lr) of every training line: what must equal bit for bit."""
    from fastllm.train.metrics import read_metrics

    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_metrics(run_dir / "metrics.jsonl")
            if "loss" in r]


def final_state(run_dir: Path) -> tuple[dict, dict]:
    """(metadata, every tensor by name) of the newest checkpoint of ``run_dir``, whole tensors."""
    from fastllm.sharding import checkpoint as sharded
    from fastllm.tree import flatten
    from fastllm.train import checkpointing

    meta, trees = sharded.load_full(checkpointing.latest(run_dir))
    return meta, {f"{name}.{path}": value for name, values in trees.items() for path, value in flatten(values).items()}


def assert_same_state(run_dir: Path, reference: Path) -> None:
    """The newest checkpoints hold the same params and optimizer state, bit for bit, at the same step."""
    meta, tensors = final_state(run_dir)
    want_meta, want = final_state(reference)
    assert (meta["step"], meta["key"], meta["data"]) == (want_meta["step"], want_meta["key"], want_meta["data"])
    assert tensors.keys() == want.keys()
    for name, value in tensors.items():
        assert torch.equal(value, want[name]), name


def resumed_from(output: str) -> list[int]:
    """The steps a run's output says it resumed from."""
    return [int(line.rsplit(" ", 1)[1]) for line in output.splitlines() if line.startswith("resuming from ")]


def checkpoint_steps(run_dir: Path) -> list[int]:
    from fastllm import checkpoint
    from fastllm.train import checkpointing

    return [checkpoint.step_of(p) for p in checkpoint.checkpoints(checkpointing.checkpoint_dir(run_dir))]


def read_json(path: Path):
    return json.loads(path.read_text())
