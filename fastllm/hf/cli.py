"""``fastllm convert``'s parser and run, reached from the Hugging Face package too.

The arguments and the run live in :mod:`fastllm.commands.convert`, which ``fastllm convert`` uses.
"""

from __future__ import annotations

import argparse

import torch

from fastllm.commands import convert as _command
from fastllm.commands.convert import DTYPE_NAMES, run

__all__ = ["add_parser", "run", "DTYPES"]

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The ``convert`` subcommand, its ``run`` default set (``args.run(args)`` converts)."""
    parser = _command.add_parser(subparsers)
    parser.set_defaults(run=run)
    return parser
