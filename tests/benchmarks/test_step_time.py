"""benchmarks/step_time.py: the window's statistics, and a CPU run through ``fastllm train`` that times
every step of the Trainer."""

import json

import pytest



@pytest.fixture(scope="module")
def step_time(load_benchmark):
    return load_benchmark("step_time")


def test_window_is_one_based_and_inclusive(step_time):
    seconds = [9.0, 0.1, 0.4, 0.2, 5.0]  # step 1 compiles, step 5 is outside the window
    out = step_time.summary(seconds, (2, 4), tokens_per_step=1000, flops_per_token=None)
    assert out["step_ms_median"] == 200.0 and out["step_ms_min"] == 100.0
    assert out["tokens_per_s_per_gpu"] == 5000.0 and out["mfu"] is None
    from fastllm.train.metrics import PEAK_FLOPS

    assert step_time.summary(seconds, (2, 4), 1000, 1e9)["mfu"] == pytest.approx(5000 * 1e9 / PEAK_FLOPS, rel=1e-3)


def test_cpu_run_times_each_step_of_the_trainer(step_time, tmp_path, capsys):
    from fastllm.train.quickstart import prepare_quickstart

    data, _ = prepare_quickstart(tmp_path / "data", max_bytes=60_000, vocab_size=320)
    overrides = ["model.preset=tiny-llama", "model.vocab_size=320", "data.seq_len=32", "train.batch_size=2", "mesh.data=1",
                 "zero.stage=0"]
    command = step_time.train_vs_peer.train_command("recipes/llama3_8b.py", overrides, str(data), 4, 4, tmp_path / "run")
    seconds, trainer = step_time.timed_train(command)
    assert len(seconds) == 4 and all(s > 0 for s in seconds)
    assert trainer.train_step.seconds is seconds  # the Trainer ran the timed step
    assert step_time.main(["recipes/llama3_8b.py", "--data", str(data), *overrides, "--steps", "3", "--window", "2-3"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["device"] == "cpu" and out["steps"] == "2-3"
    assert out["tokens_per_s_per_gpu"] == pytest.approx(2 * 32 / (out["step_ms_median"] / 1e3), rel=1e-3)
    assert 0 < out["mfu"] < 1


def test_bad_window_is_one_line(step_time, capsys):
    with pytest.raises(SystemExit):
        step_time.main(["recipes/llama3_8b.py", "--data", "DIR", "--steps", "3", "--window", "2-5"])
    assert "--window 2-5" in capsys.readouterr().err
