"""benchmarks/profile_train.py: the trace summary (kinds, per-step division, matmul FLOPs) and its
CPU run through ``fastllm train``."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def profile_train(load_benchmark):
    return load_benchmark("profile_train")


def _trace():
    kernel = lambda name, dur: {"ph": "X", "cat": "kernel", "name": name, "ts": 0, "dur": dur}  # noqa: E731
    op = lambda name, dims, types, ts: {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": 10,  # noqa: E731
                                        "args": {"Input Dims": dims, "Input type": types}}
    return {"traceEvents": [
        kernel("nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_NNN", 600), kernel("nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_NNN", 600),
        kernel("triton_poi_fused_mul_silu_0", 200), kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 400),
        kernel("multi_tensor_apply_kernel<adam>", 100), {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 0, "dur": 100},
        op("aten::mm", [[128, 64], [64, 32]], ["c10::BFloat16", "c10::BFloat16"], 0),
        op("aten::addmm", [[32], [128, 64], [64, 32], [], []], ["c10::BFloat16"] * 3 + ["Scalar", "Scalar"], 1990),
        op("aten::addmm_", [[64, 32], [64, 128], [128, 32], [], []], ["c10::BFloat16"] * 3 + ["Scalar", "Scalar"], 3),
        op("aten::linear", [[128, 64], [32, 64]], ["c10::BFloat16"] * 2, 5),  # not a leaf matmul: not counted
        op("aten::_scaled_mm", [[128, 64], [64, 32], [], [], [], []],
           ["c10::Float8_e5m2", "c10::Float8_e4m3fn", "float", "float", "", ""], 6),
        op("aten::_grouped_mm", [[128, 64], [4, 64, 32], [4], [], []], ["c10::BFloat16"] * 2 + ["int"] + ["", ""], 7),
        op("aten::_grouped_mm", [[32, 128], [128, 64], [4], [], []], ["c10::BFloat16"] * 2 + ["int"] + ["", ""], 8),
        {"ph": "i", "name": "instant", "ts": 7}]}


def test_summary_divides_per_step_and_sorts_kinds(profile_train):
    summary = profile_train.summarize(_trace(), steps=2)
    assert summary["by_kind_ms"] == {"matmul": 0.6, "attention": 0.2, "triton": 0.1, "optimizer": 0.05, "copy": 0.05}
    assert summary["busy_ms"] == pytest.approx(1.0)
    assert summary["span_ms"] == pytest.approx(2000 / 2 / 1e3)
    name, calls, ms = summary["kernels"][0]
    assert name.startswith("nvjet") and calls == 1 and ms == pytest.approx(0.6)


def test_matmul_ops_and_flops(profile_train):
    ops = profile_train.summarize(_trace(), steps=2)["matmuls"]
    assert sorted(op for op, *_ in ops) == ["aten::_grouped_mm"] * 2 + ["aten::_scaled_mm", "aten::addmm", "aten::addmm_",
                                                                      "aten::mm"]
    assert {dtype for (*_, dtype) in ops} == {"bfloat16", "float8_e5m2,float8_e4m3fn"}
    assert all(calls == 0.5 for calls in ops.values())
    total = sum(calls * profile_train.flops(op, json.loads(dims)) for (op, dims, _, _), calls in ops.items())
    # the added tensor is not an operand; grouped: rows in groups, and the weight gradient's grouped contraction
    assert total == 0.5 * (3 * (2 * 128 * 64 * 32) + 2 * 64 * 128 * 32 + 2 * 128 * 64 * 32 + 2 * 32 * 128 * 64)
    assert profile_train.flops("aten::bmm", [[4, 8, 16], [4, 16, 2]]) == 2 * 4 * 8 * 16 * 2
    import torch

    for (op, dims, strides, dtype), _ in ops.items():  # each re-runs alone with its operands in place
        dtype = {"aten::_scaled_mm": dtype, "aten::_grouped_mm": dtype}.get(op, "float32")  # as the op takes them
        assert profile_train.time_alone(op, json.loads(dims), json.loads(strides), dtype, torch.device("cpu"), 2) > 0


def test_cpu_run_counts_the_models_matmuls(profile_train, tmp_path, capsys):
    """Through ``fastllm train`` on CPU, no recomputation: every weight's three matmuls (forward, both gradients) are
    found, and at most the attention's score and value products besides."""
    from fastllm import models
    from fastllm.config import load_recipe
    from fastllm.train.quickstart import prepare_quickstart

    data, _ = prepare_quickstart(tmp_path / "data", max_bytes=60_000, vocab_size=320)
    overrides = ["model.preset=tiny-llama", "model.vocab_size=320", "data.seq_len=32", "train.batch_size=2", "train.remat=none", "mesh.data=1",
                 "zero.stage=0"]
    assert profile_train.main(["recipes/llama3_8b.py", "--data", str(data), *overrides, "--steps", "3",
                               "--profile", "2-3"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = load_recipe(str(ROOT / "recipes" / "llama3_8b.py"), overrides)[1].model_config
    tokens = 2 * 32
    weights = 6 * models.matmul_param_count(config) * tokens
    attention = 12 * config.n_layers * 32 * config.n_heads * config.head_dim * tokens  # full S x S, both products
    assert weights <= out["matmul_gflop_per_step"] * 1e9 * (1 + 1e-3) <= (weights + attention) * (1 + 1e-3)
    assert out["device"] == "cpu" and out["distinct_matmuls"] > 0 and out["matmul_alone_ms"] > 0


def test_train_command_cuts_only_a_warmup_that_outlasts_the_run(profile_train, tmp_path):
    """The measured run is the user's command; a recipe's warmup longer than the run (500 steps in
    recipes/llama3_8b.py) is cut to a quarter of it, a shorter one is left as the recipe has it."""
    command = profile_train.train_vs_peer.train_command
    long = command("recipes/llama3_8b.py", [], "DIR", 40, 10, tmp_path)
    assert long[long.index("train") + 1] == "recipes/llama3_8b.py" and "optim.warmup_steps=10" in long
    assert {"data.datasets=DIR", "train.steps=40", "train.log_every=10", f"run.dir={tmp_path}"} <= set(long)
    short = command("recipes/llama3_8b.py", ["optim.warmup_steps=5"], "DIR", 40, 10, tmp_path)
    assert [arg for arg in short if arg.startswith("optim.warmup_steps")] == ["optim.warmup_steps=5"]
