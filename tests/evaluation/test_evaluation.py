"""fastllm eval (loss and perplexity of any checkpoint format on held-out data), the scoring
primitives, and lm-evaluation-harness running a local task through the adapter."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from fastllm import cli, hf, models
from fastllm.data import DataConfig, make_loader
from fastllm.evaluation import continuation_logprobs, evaluate_checkpoint, rolling_logprob
from fastllm.nn.loss import cross_entropy
from fastllm.train.config import Config, ModelSection, OptimSection, RunConfig, TrainSection
from fastllm.train.quickstart import prepare_quickstart
from fastllm.train.run import train

VOCAB = 320


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run, its Hugging Face export and a prepared dataset."""
    root = tmp_path_factory.mktemp("eval")
    tokens, _ = prepare_quickstart(root / "data", max_bytes=120_000, vocab_size=VOCAB)
    config = Config(
        run=RunConfig(dir=str(root / "run"), progress="off", export_hf=True),
        model=ModelSection(preset="tiny-llama", vocab_size=VOCAB, n_layers=1, max_seq_len=64),
        data=DataConfig(datasets=(str(tokens),), seq_len=32, prefetch=0),
        train=TrainSection(steps=8, batch_size=4, log_every=4), optim=OptimSection(lr=3e-3, warmup_steps=2))
    train(config, print_fn=lambda *_: None)
    return SimpleNamespace(dir=root / "run", hf=root / "run" / "hf", data=tokens)


def _reference_loss(loaded, data, seq_len: int, batch_size: int, batches: int) -> float:
    loader = make_loader(DataConfig(datasets=(str(data),), seq_len=seq_len, validation_fraction=0.0, prefetch=0),
                         micro_batch_size=batch_size)
    total = weight = 0.0
    for _ in range(batches):
        batch = next(loader)
        logits = models.apply(loaded.config, loaded.params, batch["tokens"], segment_ids=batch["segment_ids"])
        loss, tokens = cross_entropy(logits, batch["targets"])
        total, weight = total + loss.item() * tokens.item(), weight + tokens.item()
    return total / weight


def test_eval_any_format_matches_a_plain_forward(run, capsys):
    result = evaluate_checkpoint(run.hf, run.data, seq_len=32, batch_size=4, max_batches=3)
    loaded = hf.load_any(run.hf, dtype=torch.float32)
    assert result.loss == pytest.approx(_reference_loss(loaded, run.data, 32, 4, 3), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss)) and result.batches == 3
    assert 0 < result.loss < math.log(VOCAB)  # trained: better than uniform
    assert cli.main(["eval", str(run.dir), "--data", str(run.data), "--seq-len", "32", "--batch-size", "4",
                     "--batches", "3"]) == 0  # the run directory (its training checkpoint)
    printed = json.loads(capsys.readouterr().out)
    assert printed["loss"] == pytest.approx(result.loss, rel=1e-5) and printed["tokens"] == result.tokens


def test_eval_bad_input_is_one_line(run, tmp_path, capsys):
    assert cli.main(["eval", str(run.hf), "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastllm eval: error:") and str(tmp_path / "nope") in err and err.count("\n") == 1
    assert cli.main(["eval", str(run.hf), "--data", str(run.data), "--seq-len", "1000"]) == 2
    assert "max_seq_len=64" in capsys.readouterr().err


def test_scoring_primitives(run):
    loaded = hf.load_any(run.hf, dtype=torch.float32)
    config, params = loaded.config, loaded.params
    ids = list(range(5, 25))
    logp = torch.log_softmax(models.apply(config, params, torch.tensor([ids[:-1]])).float(), -1)[0]
    expected = sum(logp[i, ids[i + 1]].item() for i in range(9, 19))
    ((value, greedy),) = continuation_logprobs(config, params, [(ids[:10], ids[10:])])
    assert value == pytest.approx(expected, rel=1e-5) and isinstance(greedy, bool)
    whole = rolling_logprob(config, params, ids, prefix=0)
    ((direct, _),) = continuation_logprobs(config, params, [([0], ids)])
    assert whole == pytest.approx(direct, rel=1e-5)
    long = list(range(1, 150))  # past max_seq_len=64: windows of 64 scored tokens, the last one with the
    windows = [([0], long[:64]), ([long[63]], long[64:128]), (long[84:128], long[128:])]  # most context that fits
    expected = sum(value for value, _ in continuation_logprobs(config, params, windows))
    assert rolling_logprob(config, params, long, prefix=0) == pytest.approx(expected, rel=1e-5)


def test_lm_eval_harness_runs_a_local_task(run, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    from fastllm.evaluation.harness import FastllmLM

    docs = [{"question": "def f(x):\n    return", "choices": [" x", " qqqq zzzz"], "answer": 0},
            {"question": "import", "choices": [" os", " ))))"], "answer": 0}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny.yaml").write_text(
        "task: fastllm_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    model = FastllmLM(str(run.hf))
    results = lm_eval.simple_evaluate(model=model, tasks=["fastllm_tiny"], task_manager=TaskManager(
        include_path=str(tmp_path)), log_samples=False, bootstrap_iters=0)
    assert 0.0 <= results["results"]["fastllm_tiny"]["acc,none"] <= 1.0
    encode = lambda text: model.tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    ((logp, _),) = model.loglikelihood([SimpleNamespace(args=("def f(x): ", "return x"))])
    context, whole = encode("def f(x):"), encode("def f(x): return x")  # the space moves to the continuation
    ((expected, _),) = continuation_logprobs(model.config, model.params, [(context, whole[len(context):])])
    assert logp == pytest.approx(expected, rel=1e-6)
    rolling = model.loglikelihood_rolling([SimpleNamespace(args=("import os\nimport sys\n",))])
    (free,) = model.generate_until([SimpleNamespace(args=("def ", {"until": [], "max_gen_toks": 12}))])
    stop = free[3:5]  # greedy decoding repeats itself: stopping at a piece of it cuts it there
    (cut,) = model.generate_until([SimpleNamespace(args=("def ", {"until": [stop], "max_gen_toks": 12}))])
    assert rolling[0] < 0 and len(free) >= 5 and cut == free[:free.index(stop)]
