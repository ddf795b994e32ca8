"""benchmarks/train_vs_peer.py: which runs a call makes (variants beside the plain run) and the
ratios it prints."""

import pytest


@pytest.fixture(scope="module")
def train_vs_peer(load_benchmark):
    return load_benchmark("train_vs_peer")


def test_variants_are_extra_fastllm_runs_before_the_peers(train_vs_peer):
    args = train_vs_peer.parse_args(["recipes/llama3_8b.py", "--data", "D", "model.n_layers=4", "--peer-loss", "flce,ce",
                                     "--variant", "model.kernels.matmul=fp8", "--variant", "train.remat=none train.compile=true"])
    assert args.overrides == ["model.n_layers=4"]
    assert train_vs_peer.runs(args) == [("fastllm", (), None), ("fastllm", ("model.kernels.matmul=fp8",), None),
                                        ("fastllm", ("train.remat=none", "train.compile=true"), None),
                                        ("peer", (), "flce"), ("peer", (), "ce")]
    args.system = "peer"
    assert [run[0] for run in train_vs_peer.runs(args)] == ["peer", "peer"]


def test_ratios_are_over_the_fastest_peer(train_vs_peer):
    rows = [{"system": "fastllm", "tokens_per_s_per_gpu": 120.0},
            {"system": "fastllm", "variant": "model.kernels.matmul=fp8", "tokens_per_s_per_gpu": 150.0},
            {"system": "fastllm", "variant": "bad", "error": "exit 1"},
            {"system": "peer", "loss": "flce", "tokens_per_s_per_gpu": 100.0},
            {"system": "peer", "loss": "ce", "tokens_per_s_per_gpu": 80.0}]
    assert train_vs_peer.ratios(rows) == {"": 1.2, "model.kernels.matmul=fp8": 1.5}
    assert train_vs_peer.ratios(rows[:2]) == {}
