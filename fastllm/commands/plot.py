"""``fastllm plot RUN_DIR... [--out FILE.png]``: the curves of one or several runs, overlaid."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plot", help="plot loss, validation loss, lr, grad norm and tokens/s of runs",
        description="Draw the curves of each run's metrics.jsonl (training and validation loss, learning "
                    "rate, gradient norm, tokens/s) against the step, the runs overlaid, into one PNG. "
                    "Needs matplotlib (pip install 'fastllm[plot]').")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or metrics.jsonl files)")
    parser.add_argument("--out", default=None,
                        help="the PNG to write (default: curves.png in the first run directory)")
    return parser


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastllm.errors import UserError

    try:
        from fastllm.train.plot import plot_runs
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("fastllm plot needs matplotlib: pip install 'fastllm[plot]'") from None
    first = Path(args.runs[0])
    out = args.out or str((first if first.is_dir() else first.parent) / "curves.png")
    plot_runs(args.runs, out)
    print(f"wrote {out}")
    return 0
