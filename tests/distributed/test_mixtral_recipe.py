"""recipes/mixtral_8x7b.py at tiny size through the command line under torchrun, in its shipped
layout shape (experts over data, attention and expert MLPs over tensor=2, ZeRO-3, recomputation;
data cut from 8 to 2 ranks for 4 experts): the same losses as one process (fp32 here, so that they
compare to 1e-5; the recipe trains in bf16). Both take the global batch in one micro-batch: with
accumulation the router's statistics are per global micro-batch, whose rows depend on the split."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import recipe_checks

from fastllm.train.quickstart import prepare_quickstart

pytestmark = pytest.mark.distributed
RECIPE = str(Path(__file__).parents[2] / "recipes" / "mixtral_8x7b.py")
VOCAB = 320  # the quickstart tokenizer's; divisible by tensor=2


def train(run_dir: Path, dataset: Path, processes: int, *overrides: str) -> list[float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTLLM_TYPECHECK="0")
    args = ["-m", "fastllm", "train", RECIPE, "model.preset=tiny-mixtral", f"model.vocab_size={VOCAB}",
            f"data.datasets={dataset}", "data.seq_len=32", "data.prefetch=0", "data.validation_fraction=0",
            "train.steps=3", "train.batch_size=4", "train.precision=fp32", "train.log_every=1", "train.eval_every=0",
            "train.checkpoint_every=0", "optim.warmup_steps=1", "optim.lr=1e-3", f"run.dir={run_dir}",
            "run.progress=off", *overrides]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else []
    done = subprocess.run([sys.executable, *launcher, *args], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return recipe_checks.losses(run_dir)


def test_the_mixtral_recipe_trains_through_torchrun_in_its_layout(tmp_path):
    dataset, _ = prepare_quickstart(tmp_path / "data", max_bytes=60_000, vocab_size=VOCAB)
    # one micro-batch a step in both: the router's statistics are per global micro-batch
    spread = train(tmp_path / "spread", dataset, 4, "mesh.data=2", "train.micro_batch_size=2")
    alone = train(tmp_path / "alone", dataset, 1, "mesh.data=1", "mesh.tensor=1", "train.micro_batch_size=4")
    assert len(spread) == 3 and spread == pytest.approx(alone, rel=1e-5)
    config = json.loads((tmp_path / "spread" / "config.json").read_text())
    assert config["mesh"]["rules"]["experts"] == "data" and config["zero"]["stage"] == 3
    index = (tmp_path / "spread" / "checkpoints" / "step-00000003" / "sharded.json").read_text()
    assert "shard-00003.safetensors" in index  # every rank holds experts or blocks of its own
