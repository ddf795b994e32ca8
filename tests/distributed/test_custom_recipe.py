"""A model defined in a recipe (recipes/gptj_style.py: GPT-J's parallel block from fastllm.nn, no
sharding code) trains through the Trainer on one process and on 4 gloo ranks at data=4 ZeRO-3,
tensor=4 with sequence parallelism and data=2 x tensor=2 ZeRO-3, with the same losses; and through
the command line under torchrun, where the same global batch gives the same losses at data=1, 2
and 4, and at data=2 x tensor=2 x pipe=2 on 8 processes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import recipe_checks

from fastllm.sharding import testing
from fastllm.train.quickstart import prepare_quickstart

pytestmark = pytest.mark.distributed
RECIPE = str(Path(__file__).parents[2] / "recipes" / "gptj_style.py")
VOCAB = 320  # divisible by 4 tensor ranks


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tokens, _ = prepare_quickstart(tmp_path_factory.mktemp("data"), max_bytes=60_000, vocab_size=VOCAB)
    return str(tokens)


def overrides(run_dir, dataset) -> list[str]:
    return [f"run.dir={run_dir}", f"data.datasets={dataset}", f"model.vocab_size={VOCAB}", "data.seq_len=32",
            "data.prefetch=0", "data.validation_fraction=0", "train.steps=5", "train.batch_size=8", "train.log_every=1",
            "train.eval_every=0", "train.checkpoint_every=0", "optim.warmup_steps=1", "run.progress=off"]


def test_a_recipe_model_trains_on_every_layout_as_on_one_process(tmp_path, dataset):
    one = recipe_checks.train_recipe(RECIPE, overrides(tmp_path / "one", dataset))
    assert len(one) == 5 and one[-1] < one[0]
    layouts = {"data4_zero3": ["mesh.data=4", "zero.stage=3"],
               "tensor4_sp": ["mesh.tensor=4", "mesh.rules.seq=tensor"],
               "data2_tensor2_zero3": ["mesh.data=2", "mesh.tensor=2", "zero.stage=3"]}
    for name, layout in layouts.items():
        reports = testing.run(recipe_checks.train_recipe, 4, RECIPE, overrides(tmp_path / name, dataset) + layout,
                              timeout_s=300.0)
        assert reports[0] == pytest.approx(one, rel=1e-5), name


def _cli(run_dir, dataset, processes: int, layout: tuple[str, ...] = ()) -> list[float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTLLM_TYPECHECK="0")
    args = ["-m", "fastllm", "train", RECIPE, *overrides(run_dir, dataset), *(layout or [f"mesh.data={processes}"])]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *args]
    else:
        command = [sys.executable, *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return recipe_checks.losses(run_dir)


def test_the_global_batch_fixes_the_losses_through_torchrun(tmp_path, dataset):
    """``train.batch_size`` is sequences per step over all ranks: data=1, 2 and 4 read the same
    global batches and give the same losses (accumulation and micro-batches follow the mesh)."""
    losses = {n: _cli(tmp_path / f"data{n}", dataset, n) for n in (1, 2, 4)}
    assert len(losses[1]) == 5
    assert losses[2] == pytest.approx(losses[1], rel=1e-5)
    assert losses[4] == pytest.approx(losses[1], rel=1e-5)


def test_a_recipe_model_pipelines_with_data_and_tensor_through_torchrun_on_8_ranks(tmp_path, dataset):
    """data=2 x tensor=2 x pipe=2 with sequence parallelism and ZeRO-1 (1F1B over 4 micro-batches of
    one sequence per data rank): the losses of one process."""
    one = _cli(tmp_path / "one", dataset, 1)
    layout = ("mesh.data=2", "mesh.tensor=2", "mesh.pipe=2", "mesh.rules.seq=tensor", "zero.stage=1",
              "train.micro_batch_size=1")
    assert _cli(tmp_path / "d2t2p2", dataset, 8, layout) == pytest.approx(one, rel=1e-5)
