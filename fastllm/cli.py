"""The ``fastllm`` command: ``train``, ``generate``, ``prepare`` and ``convert``.

Every subcommand is a thin front for a Python call (:func:`fastllm.train.run.train`,
:func:`fastllm.generate.generate`, :func:`fastllm.data.prepare`, :func:`fastllm.hf.convert`);
heavy modules are imported only when their subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

__all__ = ["main", "build_parser"]

_DELEGATED = (("fastllm.data.cli", "prepare"), ("fastllm.hf.cli", "convert"))


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
        "generate", help="sample text from a checkpoint", description="Continue PROMPT with a model from a "
        "training checkpoint, a run directory (its newest checkpoint) or a Hugging Face directory.")
    parser.add_argument("checkpoint", help="checkpoint, run or Hugging Face model directory")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: found beside the checkpoint)")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(_run=_run_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastllm", description="Declarative LLM training on PyTorch.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(subparsers)
    _add_generate(subparsers)
    for module_name, command in _DELEGATED:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:  # keep the other commands usable
            sub = subparsers.add_parser(command, help=f"(unavailable: {error})")
            sub.set_defaults(_run=lambda args, e=error: _fail(f"fastllm {command} is unavailable: {e}"))
            continue
        module.add_parser(subparsers).set_defaults(_run=module.run)
    return parser


def _fail(message: str) -> int:
    print(f"fastllm: error: {message}", file=sys.stderr)
    return 2


def _run_train(args: argparse.Namespace) -> int:
    import json

    from fastllm.config import ConfigError, load_recipe, to_dict

    try:
        recipe, config = load_recipe(args.recipe, args.overrides)
    except ConfigError as error:
        return _fail(str(error))
    if args.print_config:
        print(json.dumps(to_dict(config), indent=2))
        return 0
    from fastllm.train.run import train

    train(config, recipe=recipe)
    return 0


def _find_tokenizer(checkpoint: Path, explicit: Optional[str]) -> Path:
    if explicit:
        return Path(explicit)
    for directory in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if (directory / "tokenizer.json").is_file():
            return directory / "tokenizer.json"
    raise FileNotFoundError(f"no tokenizer.json beside {checkpoint}; pass --tokenizer")


def _load_any(path: Path, device: str):
    from fastllm.train import checkpointing

    if checkpointing.is_training_checkpoint(path):
        config, params, _ = checkpointing.load_model(path, device=device)
        return config, params
    from fastllm import hf

    return hf.load(path, device=device)


def _run_generate(args: argparse.Namespace) -> int:
    from fastllm.train.run import sample_text

    path = Path(args.checkpoint)
    if not path.exists():
        return _fail(f"checkpoint {str(path)!r} does not exist")
    config, params = _load_any(path, args.device)
    text = sample_text(config, params, _find_tokenizer(path, args.tokenizer), args.prompt,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed)
    print(text)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    # Overrides may come before or after --options: argparse leaves the later ones unparsed.
    args, rest = parser.parse_known_args(argv)
    if rest and args.command == "train" and not any(item.startswith("-") for item in rest):
        args.overrides = list(args.overrides) + rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
