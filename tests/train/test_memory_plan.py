"""The planner's per-rank memory against the CPU's own allocations, and the layout search.

The CPU measurement is the peak of torch's memory profiler timeline over one real train step of a
tiny model (parameters, optimizer state, gradients, saved activations and every temporary the
step allocates). The plan must be within 8% of it (measured 0-7% apart), with and without
recomputation, in bf16 and with gradient accumulation, for a model whose activations dominate and
one whose weights and logits do; and what a setting adds (bf16, accumulation) must match what it
adds to the measurement. The meta dry run's saved tensors must match what autograd saves on the
CPU."""

from __future__ import annotations

import functools
import json
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from fastllm import cli, nn, random, tree
from fastllm.config import apply_overrides
from fastllm.data import DataConfig
from fastllm.sharding import Mesh
from fastllm.train.config import Config, ModelSection, TrainSection
from fastllm.train.memory import plan_memory, search_layouts
from fastllm.train.optimizer import build_optimizer
from fastllm.train.plan import Activations, SavedTensors, plan_layout
from fastllm.train.step import TrainStep
from fastllm.train.trainer import default_model, partitioner_from_config

VOCAB, SEQ = 512, 64
BASE = Config(
    model=ModelSection(preset="tiny-llama", vocab_size=VOCAB, embed_dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       mlp_dim=192, max_seq_len=SEQ),
    data=DataConfig(datasets=("unused",), seq_len=SEQ), train=TrainSection(steps=1, batch_size=4))


# Few tokens and a wide vocabulary: weights, their copies and the logits dominate, so that each of
# those terms of the plan alone moves the total by more than the tolerance.
WIDE = ["model.vocab_size=4096", "data.seq_len=32", "train.batch_size=2"]


def _batch(rows: int, seq: int = SEQ, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"tokens": torch.randint(0, vocab, (rows, seq), generator=generator),
            "targets": torch.randint(0, vocab, (rows, seq), generator=generator),
            "segment_ids": torch.zeros(rows, seq, dtype=torch.long)}


@functools.cache
def measured_step_peak(overrides: tuple[str, ...]) -> int:
    """Peak CPU bytes over one train step (after a first one) of ``BASE`` with ``overrides``, by
    torch's memory profiler (cached: several tests compare the same measurements)."""
    config = _config(overrides)
    tmp_path = Path(tempfile.mkdtemp())
    model = default_model(config)
    partitioner = partitioner_from_config(config, Mesh.local("cpu"))
    optimizer, schedule = build_optimizer(config, clip=False)
    t = config.train
    step = TrainStep(model, partitioner, optimizer, grad_accum=t.grad_accum(1), precision=t.precision,
                     max_grad_norm=t.grad_clip, learning_rate=schedule, remat=t.remat == "block")
    state = step.init_state(random.key(0))
    batch = _batch(t.batch_size, config.data.seq_len, config.model_config.vocab_size)
    state, _ = step(state, batch)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step(state, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the CPU timeline has no successor API yet
        prof.export_memory_timeline(str(tmp_path / "timeline.json"), device="cpu")
    _, sizes = json.loads((tmp_path / "timeline.json").read_text())
    return max(sum(row) for row in sizes)


def _config(overrides: tuple[str, ...]) -> Config:
    return apply_overrides(BASE, list(overrides)) if overrides else BASE


ACCUMULATION = ("train.batch_size=8", "train.micro_batch_size=4")
# Weights dominate: a plan that kept a whole micro-batch's gradients beside the accumulated ones
# (autograd adds each leaf's fresh gradient in place, one at a time) is 10% over here.
WIDE_ACCUMULATION = ("train.batch_size=4", "train.micro_batch_size=2")


@pytest.mark.parametrize("overrides", [
    (), ("train.remat=block",), ("train.precision=bf16",), ACCUMULATION,
    tuple(WIDE), (*WIDE, "train.precision=bf16"), (*WIDE, "train.remat=block"), (*WIDE, *WIDE_ACCUMULATION),
], ids=["fp32", "remat", "bf16", "accumulation", "wide", "wide-bf16", "wide-remat", "wide-accumulation"])
def test_plan_matches_cpu_allocations_of_a_step(overrides):
    plan = plan_memory(_config(overrides), target="cpu")
    measured = measured_step_peak(overrides)
    assert abs(plan.total - measured) <= 0.08 * measured, f"planned {plan.total:,} B {plan.rows()}, measured {measured:,} B"


@pytest.mark.parametrize("base, change", [((), ("train.precision=bf16",)), (tuple(WIDE), WIDE_ACCUMULATION)],
                         ids=["bf16", "accumulation"])
def test_what_a_setting_adds_matches_the_measurement(base, change):
    """bf16 halves the activations and adds a compute copy of the weights; accumulation adds one
    leaf's fresh gradient at a time into the accumulated ones: the plan's difference is the CPU's.
    Accumulation is checked where the weights dominate: where activations do, the step without it
    peaks early in the backward, before most gradients exist, and the plan's sum of rows (gradients
    included) is an upper bound of that peak, so the difference says nothing of the new term."""
    planned = plan_memory(_config((*base, *change)), target="cpu").total - plan_memory(_config(base), target="cpu").total
    measured = measured_step_peak((*base, *change)) - measured_step_peak(base)
    assert abs(planned - measured) <= 0.03 * measured_step_peak(base), f"planned {planned:+,} B, measured {measured:+,} B"


def test_meta_dry_run_saves_what_autograd_saves_on_cpu():
    report = plan_layout(BASE, target="cpu")
    model = default_model(BASE)
    partitioner = partitioner_from_config(BASE, Mesh.local("cpu"))
    params = tree.map(lambda t: t.requires_grad_(True), partitioner.init_params(model, random.key(0)))
    real = SavedTensors(params)
    nn.run(model, params, _batch(4), call=real)
    planned = report.activations.parts
    assert [(p.name, p.input_bytes) for p in real.parts] == [(p.name, p.input_bytes) for p in planned]
    for ours, cpu in zip(planned, real.parts):  # the CPU's flash kernel also keeps a float copy of the mask
        assert cpu.saved_bytes > 0 and abs(ours.saved_bytes - cpu.saved_bytes) <= 0.05 * cpu.saved_bytes, cpu.name


def test_remat_and_tensor_parallel_shrink_activations():
    report = plan_layout(BASE, target="cpu")
    assert report.activations.bytes(True) < report.activations.bytes(False)
    split = plan_layout(apply_overrides(BASE, ["mesh.tensor=2"]), target="cpu")
    blocks = [p.saved_bytes for p in report.activations.parts if p.repeated]
    split_blocks = [p.saved_bytes for p in split.activations.parts if p.repeated]
    assert all(s < b for s, b in zip(split_blocks, blocks))  # heads and mlp split over tensor ranks


def test_gpu_kernels_save_less_than_the_references():
    """Planned for a GPU, the Triton kernels' own saved tensors are counted (on meta tensors,
    where a launch does nothing): less than the torch references keep, the logits above all."""
    pytest.importorskip("triton")
    cpu, gpu = (plan_layout(BASE, target=target).activations for target in ("cpu", "cuda"))
    assert gpu.bytes(False) < cpu.bytes(False)
    head = {p.name: p for p in gpu.parts}["head"]
    assert head.largest_bytes < 4 * SEQ * VOCAB * 4  # no [tokens, vocab] fp32 logits kept


def test_search_ranks_layouts_that_fit():
    ranking = search_layouts(BASE, None, gpus=4, gpu_bytes=2**30)
    assert ranking.fits and all(c.plan.total <= 0.9 * 2**30 for c in ranking.fits)
    assert [c.step_s for c in ranking.fits] == sorted(c.step_s for c in ranking.fits)
    tensor_splits = {c.plan.config.mesh.tensor for c in ranking.fits}
    assert tensor_splits == {1, 2}  # 4 heads / 2 kv heads: tensor=4 is refused
    assert any("mesh.tensor=4" in reason for reason in ranking.refused)
    assert {c.plan.config.mesh.pipe for c in ranking.fits} == {1, 2}  # 2 layers: pipe=4 is refused
    assert any("mesh.pipe=4" in reason for reason in ranking.refused)
    tiny = search_layouts(BASE, None, gpus=1, gpu_bytes=2**20)
    assert not tiny.fits and tiny.too_big and "none fits" in tiny.table()


def test_plan_command(tmp_path, capsys):
    assert cli.main(["plan", "recipes/smollm2_135m.py", "model.n_layers=2", "--gpus", "2", "--gpu-memory", "40",
                     "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "memory per rank:" in out and "activations" in out and "layouts of 2 GPUs" in out
    assert out.count("mesh.data=") == 3
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plan", "recipes/smollm2_135m.py", "--gpu-memory", "-1"])
    assert exit_.value.code == 2 and "--gpu-memory" in capsys.readouterr().err


def test_communication_per_step():
    """The data axis' gradient reduction and ZeRO gathers by the ring formulas; the tensor axis'
    activation collectives as the dry run records them, once per micro-batch."""
    numel = sum(p.numel for p in tree.leaves(default_model(BASE).declarations, is_leaf=nn.is_param))
    share = 3 / 4
    zero0 = plan_memory(apply_overrides(BASE, ["mesh.data=4"])).communication
    assert zero0 == {"all_reduce over data (gradients)": int(2 * share * numel * 4)}
    zero3 = plan_memory(apply_overrides(BASE, ["mesh.data=4", "zero.stage=3", "train.batch_size=8",
                                               "train.micro_batch_size=1"])).communication
    assert zero3["reduce_scatter over data (gradients)"] == pytest.approx(share * numel * 4, rel=0.01)
    assert zero3["all_gather over data (parameters)"] == pytest.approx(2 * share * numel * 4 * 2, rel=0.01)
    tensor = plan_memory(apply_overrides(BASE, ["mesh.tensor=2", "train.micro_batch_size=2"]))
    traffic = tensor.report.traffic()
    assert traffic and tensor.communication == {f"{kind} over {axis} (activations)": nbytes * 2
                                                for (kind, axis), nbytes in sorted(traffic.items())}


def test_a_pipeline_rank_plans_its_stage_and_the_micro_batches_it_holds():
    """At pipe=2, rank 0 runs the embedding and the first block: it keeps 1F1B's ``P - r = 2``
    micro-batches' activations (GPipe: all 4 of the step), and sends each micro-batch's carry on."""
    overrides = ["train.micro_batch_size=1", "mesh.pipe=2"]
    whole = plan_layout(apply_overrides(BASE, overrides[:1]), target="cpu").activations
    plans = {name: plan_memory(apply_overrides(BASE, [*overrides, f"pipe.schedule={name}"]), target="cpu")
             for name in ("1f1b", "gpipe")}
    stage = plans["1f1b"].report.activations
    assert [p.name for p in stage.parts] == [p.name for p in whole.parts[:2]]
    kept = sum(p.saved_bytes for p in stage.parts)
    alone = Activations(stage.parts).bytes(False)
    assert (stage.in_flight, plans["gpipe"].report.activations.in_flight) == (2, 4)
    assert plans["1f1b"].activations(False) == alone + kept
    assert plans["gpipe"].activations(False) == alone + 3 * kept
    assert plans["1f1b"].communication == {"send/recv over pipe (activations)": whole.parts[2].input_bytes * 4}
    assert plans["1f1b"].report.description.totals["params"] < plan_memory(BASE).report.description.totals["params"]
