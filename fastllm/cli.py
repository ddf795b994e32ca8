"""The ``fastllm`` command: ``train``, ``generate``, ``prepare`` and ``convert``.

Every subcommand is a thin front for a Python call (:func:`fastllm.train.run.train`,
:func:`fastllm.generate.generate_text`, :func:`fastllm.data.prepare`, :func:`fastllm.hf.convert`, ...);
heavy modules are imported only when their subcommand runs, so ``--help`` answers at once.

Bad input of any subcommand (a :class:`fastllm.errors.UserError`, an ``OSError``, a flag argparse
refuses) ends as one line on stderr and exit status 2; anything else is a bug and keeps its traceback.
A command that stops early (:class:`fastllm.errors.Stop`: a training run stopped by a signal, a
peer rank that died) prints its one line and exits with its own status; Ctrl-C before training
began prints one line and exits 130. Under torchrun only rank 0 prints bad input (every rank meets
it), and a stop is said by the one rank its message names.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Optional

from fastllm.errors import EXPECTED, Stop, UserError, one_line

__all__ = ["main", "build_parser", "ArgumentParser", "report_errors"]

# Each builds its parser from argparse alone (``fastllm --help`` imports no torch); see fastllm.commands.
_DELEGATED = tuple((f"fastllm.commands.{name}", name) for name in ("prepare", "convert", "eval", "plan", "plot"))


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (its own prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def report_errors(run: Callable[[argparse.Namespace], int], args: argparse.Namespace, prog: str) -> int:
    """``run(args)``, with expected errors printed as one line and turned into exit status 2."""
    rank_zero = os.environ.get("RANK", "0") == "0"
    try:
        return int(run(args) or 0)
    except Stop as stop:
        if stop.speaker:
            print(f"{prog}: {one_line(stop)}", file=sys.stderr)
        return stop.code
    except EXPECTED as error:
        if rank_zero:
            print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before a training loop took the signal over
        if rank_zero:
            print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _checked(convert: Callable[[str], object], test: Callable[[object], bool], expected: str):
    """An argparse ``type`` that parses with ``convert`` and accepts what passes ``test``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not test(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected  # argparse names the type in some messages
    return parse


positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_temperature = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0: greedy)")
_top_p = _checked(float, lambda v: 0 < v <= 1, "a probability in (0, 1]")
_prompt = _checked(str, lambda v: v.strip() != "", "a non-empty prompt")


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="run a recipe", description="Build the config of RECIPE.py (its config() function), "
        "apply key.sub=value overrides, train, and export/sample as the config says. See docs/config.md.")
    parser.add_argument("recipe", help="a recipe file, e.g. recipes/quickstart.py")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.set_defaults(_run=_run_train)


def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="sample text from a checkpoint", description="Continue PROMPT with a model from a run "
        "directory (its newest checkpoint), a training checkpoint, a fastllm model directory or a Hugging Face "
        "directory.")
    parser.add_argument("checkpoint", help="run, checkpoint, fastllm or Hugging Face model directory")
    parser.add_argument("--prompt", required=True, type=_prompt, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to add (default 64)")
    parser.add_argument("--temperature", type=_temperature, default=0.0,
                        help="softmax temperature; 0: greedy (default)")
    parser.add_argument("--top-k", type=positive_int, default=None, help="sample among the K likeliest tokens")
    parser.add_argument("--top-p", type=_top_p, default=None,
                        help="sample among the likeliest tokens whose probabilities add up to P (nucleus)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed of the sampling (default 0)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one saved with the model)")
    parser.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.set_defaults(_run=_run_generate)


def build_parser() -> argparse.ArgumentParser:
    from fastllm import __version__

    parser = ArgumentParser(prog="fastllm", description="Declarative LLM training on PyTorch.")
    parser.add_argument("--version", action="version", version=f"fastllm {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(subparsers)
    _add_generate(subparsers)
    for module_name, command in _DELEGATED:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:  # keep the other commands usable
            sub = subparsers.add_parser(command, help=f"(unavailable: {error})")
            sub.set_defaults(_run=lambda args, e=error, c=command: _unavailable(c, e))
            continue
        module.add_parser(subparsers).set_defaults(_run=module.run)
    return parser


def _unavailable(command: str, error: ImportError) -> int:
    raise UserError(f"fastllm {command} is unavailable: {error}")


def _run_train(args: argparse.Namespace) -> int:
    import json

    from fastllm.config import to_dict
    from fastllm.train.recipes import load_train_recipe

    recipe, config = load_train_recipe(args.recipe, args.overrides)
    if args.print_config:
        print(json.dumps(to_dict(config), indent=2))
        return 0
    from fastllm.train.run import train

    train(config, recipe=recipe)
    return 0


def _tokenizer(loaded, explicit: Optional[str], checkpoint: str):
    """``--tokenizer`` if given, else the one saved with the model; refuses another vocabulary."""
    from fastllm.data.tokenizer import read_tokenizer

    saved = loaded.tokenizer
    if explicit is None:
        if saved is None:
            raise UserError(f"{checkpoint}: no tokenizer.json saved with the model; pass --tokenizer")
        return read_tokenizer(saved)
    tokenizer = read_tokenizer(explicit)
    if saved is not None and read_tokenizer(saved).get_vocab(True) != tokenizer.get_vocab(True):
        raise UserError(f"--tokenizer {explicit}: its vocabulary differs from {saved}, the tokenizer the model "
                        "was saved with (ids would decode to the wrong text)")
    return tokenizer


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from fastllm import hf
    from fastllm.generate import generate_text

    loaded = hf.load_any(args.checkpoint, dtype=torch.float32, device=args.device)
    tokenizer = _tokenizer(loaded, args.tokenizer, args.checkpoint)
    text = generate_text(loaded.config, loaded.params, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(text)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    # OpenMP threads that spin while they wait starve whatever shares the CPU (on a loaded 2-core
    # machine the quickstart ran at ~600 tokens/s with spinning threads, ~6,000 with sleeping ones).
    # Read once, when torch loads its OpenMP runtime: the commands import torch after this line.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    # Overrides may come before or after --options: argparse leaves the later ones unparsed.
    args, rest = parser.parse_known_args(argv)
    if rest and args.command == "train" and not any(item.startswith("-") for item in rest):
        args.overrides = list(args.overrides) + rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return report_errors(args._run, args, f"fastllm {args.command}")


if __name__ == "__main__":
    sys.exit(main())
