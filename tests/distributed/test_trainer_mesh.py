"""``fastllm train ... mesh.data=2 mesh.tensor=2 zero.stage=3`` in spawned gloo ranks: the Trainer
takes its mesh from the config, trains on shards, writes sharded checkpoints and resumes from them.
"""

import dataclasses
import shutil

import pytest
import torch

import trainer_checks
from fastllm import tree
from fastllm.data import DataConfig
from fastllm.train import checkpointing
from fastllm.sharding import testing
from fastllm.train.config import Config, ModelSection, OptimSection, RunConfig, TrainSection
from fastllm.train.quickstart import prepare_quickstart

pytestmark = pytest.mark.distributed
VOCAB = 320  # divisible by the tensor sizes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tokens, _ = prepare_quickstart(tmp_path_factory.mktemp("data"), max_bytes=60_000, vocab_size=VOCAB)
    return str(tokens)


def make_config(run_dir, dataset) -> Config:
    return Config(
        run=RunConfig(dir=str(run_dir), progress="off"),
        model=ModelSection(preset="tiny-llama", vocab_size=VOCAB, n_layers=1),
        data=DataConfig(datasets=(dataset,), seq_len=32, prefetch=0),
        train=TrainSection(steps=4, batch_size=4, micro_batch_size=2, log_every=1, checkpoint_every=2),
        optim=OptimSection(lr=3e-3, warmup_steps=1),
    )


def test_tensor_parallel_trainer_matches_one_process_with_and_without_sequence_parallelism(tmp_path, dataset):
    """tensor=2 reads the same batches as one process: same losses; sequence parallelism is one
    rule (``mesh.rules.seq=tensor``) and changes nothing but where the residual stream lives."""
    one = trainer_checks.train(make_config(tmp_path / "one", dataset), [])
    for name, rules in (("tp", []), ("tp_sp", ["mesh.rules.seq=tensor"])):
        reports = testing.run(trainer_checks.train, 2, make_config(tmp_path / name, dataset),
                              ["mesh.tensor=2", *rules], timeout_s=300.0)
        assert len(one) == 4 and reports[0] == reports[1]  # rank 0 writes metrics.jsonl, all read it
        assert reports[0] == pytest.approx(one, rel=1e-5), name


def test_zero3_data_tensor_mesh_resumes_from_sharded_checkpoints(tmp_path, dataset):
    overrides = ["mesh.data=2", "mesh.tensor=2", "zero.stage=3"]
    reports = testing.run(trainer_checks.interrupted_and_resumed, 4, make_config(tmp_path, dataset),
                          overrides, timeout_s=300.0)
    whole, resumed, trained = reports[0]
    assert len(whole) == 4 and whole[-1] < whole[0]
    assert trained == [3, 4]  # restored step 2, not trained afresh
    assert resumed == whole  # resumed at step 2 from each rank's shards: bit for bit
    assert (tmp_path / "whole" / "checkpoints").is_dir()


def test_pipeline_trainer_matches_one_process_and_resumes_on_other_pipe_sizes(tmp_path, dataset):
    """pipe=2 (1F1B over 2 micro-batches, 4 layers) trains like one process; its step-2 checkpoint
    resumes at pipe=2 bit for bit, and at pipe=1 and pipe=4 with the same losses (checkpoints
    hold global tensors; the stage layout is only how ranks cut them)."""
    base = dataclasses.replace(make_config(tmp_path / "one", dataset),
                               model=ModelSection(preset="tiny-llama", vocab_size=VOCAB, n_layers=4))
    one = trainer_checks.train(base, [])
    pipe2 = testing.run(trainer_checks.train, 2, base, [f"run.dir={tmp_path}/pipe2", "mesh.pipe=2"], timeout_s=300.0)
    assert len(one) == 4 and pipe2[0] == pytest.approx(one, rel=1e-5)
    stopped = tmp_path / "stopped"
    testing.run(trainer_checks.train, 2, base, [f"run.dir={stopped}", "mesh.pipe=2"], 2, timeout_s=300.0)
    for name in ("resumed2", "resumed1", "resumed4"):
        shutil.copytree(stopped, tmp_path / name)
    resumed2 = testing.run(trainer_checks.resume, 2, base, [f"run.dir={tmp_path}/resumed2", "mesh.pipe=2"],
                           timeout_s=300.0)[0]
    resumed1 = trainer_checks.resume(base, [f"run.dir={tmp_path}/resumed1"])
    resumed4 = testing.run(trainer_checks.resume, 4, base, [f"run.dir={tmp_path}/resumed4", "mesh.pipe=4"],
                           timeout_s=300.0)[0]
    for losses, trained in (resumed2, resumed1, resumed4):
        assert trained == [3, 4]  # restored step 2, not trained afresh
    assert resumed2[0] == pipe2[0]
    assert resumed1[0] == pytest.approx(pipe2[0], rel=1e-5)
    assert resumed4[0] == pytest.approx(pipe2[0], rel=1e-5)
    # What `run.export_hf` exports: the pipelined run's checkpoint assembled in one process.
    exported = checkpointing.load_model(tmp_path / "pipe2")[1]
    reference = checkpointing.load_model(tmp_path / "one")[1]
    for path, value in tree.flatten(reference).items():
        assert torch.allclose(tree.flatten(exported)[path], value, rtol=1e-5, atol=1e-6), path
