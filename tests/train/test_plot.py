"""fastllm plot: two tiny runs' curves overlaid, in the figure and in the PNG's pixels."""

from __future__ import annotations

import numpy as np
import pytest

from fastllm import cli
from fastllm.config import apply_overrides
from fastllm.data import DataConfig
from fastllm.train.config import Config, ModelSection, OptimSection, RunConfig, TrainSection
from fastllm.train.metrics import read_metrics
from fastllm.train.plot import CURVES, plot_runs
from fastllm.train.quickstart import prepare_quickstart
from fastllm.train.trainer import Trainer

pytest.importorskip("matplotlib")
VOCAB = 320


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    tokens, _ = prepare_quickstart(root / "data", max_bytes=100_000, vocab_size=VOCAB)
    base = Config(run=RunConfig(dir=str(root / "a"), progress="off"),
                  model=ModelSection(preset="tiny-llama", vocab_size=VOCAB, n_layers=1),
                  data=DataConfig(datasets=(str(tokens),), seq_len=32, validation_fraction=0.1, prefetch=0),
                  train=TrainSection(steps=6, batch_size=2, log_every=1, eval_every=3, eval_batches=2),
                  optim=OptimSection(lr=3e-3, warmup_steps=2))
    Trainer(base).run()
    Trainer(apply_overrides(base, [f"run.dir={root / 'b'}", "optim.lr=1e-2"])).run()
    return root / "a", root / "b"


def _rgb(color: str) -> np.ndarray:
    from matplotlib.colors import to_rgb

    return np.array(to_rgb(color))


def test_plot_has_every_runs_curves(runs, tmp_path):
    figure = plot_runs(runs, tmp_path / "curves.png")
    records = [read_metrics(run / "metrics.jsonl") for run in runs]
    for ax, (key, title, _) in zip(figure.axes, CURVES):
        assert ax.get_title() == title
        assert [line.get_label() for line in ax.lines] == ["a", "b"], key
        for line, run_records in zip(ax.lines, records):
            steps, values = zip(*[(r["step"], r[key]) for r in run_records if key in r])
            assert list(line.get_xdata()) == list(steps), key
            assert list(line.get_ydata()) == pytest.approx(values), key
    from matplotlib.image import imread

    pixels = imread(tmp_path / "curves.png")[..., :3]
    for line in figure.axes[0].lines:  # each run's colour is drawn in the PNG
        close = np.abs(pixels - _rgb(line.get_color())).max(axis=-1) < 0.02
        assert close.sum() > 50, line.get_label()


def test_plot_command(runs, tmp_path, capsys):
    assert cli.main(["plot", *map(str, runs), "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").stat().st_size > 10_000 and "wrote" in capsys.readouterr().out
    assert cli.main(["plot", str(tmp_path / "nope")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
