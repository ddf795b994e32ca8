"""Curves of one or several runs from their ``metrics.jsonl``: training and validation loss,
learning rate, gradient norm and tokens/s against the step, runs overlaid in one figure.

    figure = plot_runs(["runs/a", "runs/b"], "curves.png")

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global figure).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastllm.errors import UserError

__all__ = ["CURVES", "plot_runs", "run_metrics", "run_labels"]

# (metrics.jsonl key, panel title, log scale)
CURVES = (
    ("loss", "training loss", False),
    ("val_loss", "validation loss", False),
    ("lr", "learning rate", False),
    ("grad_norm", "gradient norm", True),
    ("tokens_per_s", "tokens/s", False),
)


def run_metrics(run: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run directory's ``metrics.jsonl`` (or of that file itself)."""
    from fastllm.train.metrics import read_metrics

    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{run}: no metrics.jsonl (expected a run directory or a metrics.jsonl file)")
    try:
        return read_metrics(path)
    except ValueError as error:
        raise UserError(f"{path}: not JSON lines ({error})") from None


def run_labels(runs: Sequence[str | os.PathLike]) -> list[str]:
    """Each run's directory name, or its whole path where two names are the same."""
    names = [Path(run).name if Path(run).is_dir() else Path(run).parent.name for run in runs]
    return [name if names.count(name) == 1 else str(run) for name, run in zip(names, runs)]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    return [step for step, _ in points], [float(value) for _, value in points]


def plot_runs(runs: Sequence[str | os.PathLike], out: str | os.PathLike, *, dpi: int = 100):
    """Write a PNG of every curve of ``runs`` to ``out``; returns the matplotlib ``Figure``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not runs:
        raise UserError("no run given: name one or more run directories")
    records = [run_metrics(run) for run in runs]
    figure = Figure(figsize=(4 * len(CURVES), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(CURVES))
    for ax, (key, title, log) in zip(axes, CURVES):
        for label, run_records in zip(run_labels(runs), records):
            steps, values = _series(run_records, key)
            if steps:
                ax.plot(steps, values, label=label, marker="o" if len(steps) < 3 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if log and ax.lines:
            ax.set_yscale("log")
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    axes[0].legend(fontsize="small")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=dpi)
    return figure
