"""``fastllm prepare`` as its own program: ``python -m fastllm.data.cli INPUT... --tokenizer T --output DIR``.

The arguments and the run live in :mod:`fastllm.commands.prepare`, which ``fastllm prepare`` uses.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

from fastllm.cli import ArgumentParser, report_errors
from fastllm.commands.prepare import DESCRIPTION, add_parser, configure, run

__all__ = ["add_parser", "run", "main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = configure(ArgumentParser(prog="fastllm prepare", description=DESCRIPTION))
    return report_errors(run, parser.parse_args(argv), "fastllm prepare")


if __name__ == "__main__":
    sys.exit(main())
