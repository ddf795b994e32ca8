"""``fastllm prepare``: the command-line face of ``fastllm.data.prepare`` (same options)."""

from __future__ import annotations

import argparse

from fastllm.cli import positive_int

__all__ = ["add_parser", "configure", "run"]

DESCRIPTION = ("Tokenize JSONL, Parquet, text or `datasets` directories into memory-mapped token shards "
               "(plus manifest.json) that training reads. Re-running with the same inputs does nothing. "
               "See docs/data.md.")


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``prepare``'s arguments to ``parser``."""
    parser.add_argument("inputs", nargs="+", help="JSONL / Parquet / text files, directories, or datasets "
                        "save_to_disk directories")
    parser.add_argument("--tokenizer", required=True, help="a tokenizer.json or a transformers tokenizer directory")
    parser.add_argument("--output", required=True, help="output directory (shards + manifest.json)")
    parser.add_argument("--text-field", default="text", help="JSONL/Parquet/datasets field holding the text")
    parser.add_argument("--prompt-field", default=None, help="SFT: field of the prompt (excluded from the loss)")
    parser.add_argument("--response-field", default=None, help="SFT: field of the response")
    parser.add_argument("--text-mode", choices=("file", "line"), default="file",
                        help="plain text files: one document per file or per line")
    parser.add_argument("--workers", type=positive_int, default=None, help="tokenizer processes (default: all cores)")
    parser.add_argument("--eos-token", default=None, help="EOS token appended to each document")
    parser.add_argument("--add-special-tokens", action="store_true",
                        help="let the tokenizer add its own special tokens (e.g. BOS)")
    parser.add_argument("--shard-tokens", type=positive_int, default=1 << 28, help="tokens per shard (about)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset prepared from other inputs")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``prepare`` subcommand to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser("prepare", help="tokenize text into memory-mapped token shards",
                                   description=DESCRIPTION)
    return configure(parser)


def run(args: argparse.Namespace) -> int:
    import json

    from fastllm.data.prepare import prepare

    manifest = prepare(
        args.inputs, args.tokenizer, args.output, text_field=args.text_field, prompt_field=args.prompt_field,
        response_field=args.response_field, workers=args.workers, eos_token=args.eos_token,
        add_special_tokens=args.add_special_tokens, text_mode=args.text_mode, shard_tokens=args.shard_tokens,
        overwrite=args.overwrite, progress=not args.quiet)
    summary = {key: manifest[key] for key in ("documents", "tokens", "dtype")}
    summary["shards"] = len(manifest["shards"])
    summary["output"] = args.output
    print(json.dumps(summary))
    return 0
