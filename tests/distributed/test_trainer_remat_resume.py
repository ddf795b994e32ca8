"""``train.remat=block`` under ZeRO-3 (the per-block gather inside the recomputed region) in spawned
gloo ranks: same losses as one process without recomputation; a stopped run resumes from its latest
sharded checkpoint (``step-XXXXXXXX``, the single-process naming); rank 0 exports the last
checkpoint to Hugging Face format."""

import pytest
import remat_resume_checks
import torch
import trainer_checks

from fastllm import hf, tree
from fastllm.data import DataConfig
from fastllm.sharding import testing
from fastllm.train import checkpointing
from fastllm.train.config import Config, ModelSection, OptimSection, RunConfig, TrainSection
from fastllm.train.quickstart import prepare_quickstart

pytestmark = pytest.mark.distributed
VOCAB = 320


def test_remat_zero3_matches_one_process_resumes_and_exports(tmp_path):
    tokens, _ = prepare_quickstart(tmp_path / "data", max_bytes=30_000, vocab_size=VOCAB)
    config = Config(
        run=RunConfig(dir=str(tmp_path / "run"), progress="off"),
        model=ModelSection(preset="tiny-llama", vocab_size=VOCAB, n_layers=2),
        data=DataConfig(datasets=(str(tokens),), seq_len=32, prefetch=0),
        train=TrainSection(steps=4, batch_size=4, log_every=1, checkpoint_every=2),
        optim=OptimSection(lr=3e-3, warmup_steps=1),
    )
    one = trainer_checks.train(config, [f"run.dir={tmp_path}/one"])
    reports = testing.run(remat_resume_checks.remat_zero3_resume, 2, config,
                          ["mesh.data=2", "zero.stage=3", "train.remat=block"], timeout_s=120.0)
    report = reports[0]
    assert report["whole"] == pytest.approx(one, rel=1e-5)  # the same 4 rows a step: 2 data ranks x 2
    assert report["found"] == "step-00000002" and report["restored_step"] == 2
    assert report["trained"] == [3, 4]  # the run itself restored step 2
    assert report["resumed"] == report["whole"]
    _, params, _ = checkpointing.load_model(tmp_path / "run" / "whole")
    exported = hf.load(tmp_path / "run" / "whole" / "hf")[1]
    for path, value in tree.flatten(params).items():
        assert torch.equal(tree.flatten(exported)[path], value), path
