"""``fastllm convert SRC DST [--to hf|fastllm] [--dtype float32|bfloat16|float16] [--max-shard-bytes N]``:
the command-line face of ``fastllm.hf.convert``."""

from __future__ import annotations

import argparse

from fastllm.cli import positive_int

__all__ = ["add_parser", "run", "DTYPE_NAMES"]

DTYPE_NAMES = ("bfloat16", "float16", "float32")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert", help="convert a checkpoint between Hugging Face and fastllm formats",
        description="Convert a model to Hugging Face (config.json + safetensors) or fastllm (fastllm.json + "
                    "model.safetensors) format. The source may be a training run directory (its newest "
                    "checkpoint), a training checkpoint, a fastllm or a Hugging Face directory; its format is "
                    "detected from its files.")
    parser.add_argument("src", help="run, checkpoint, fastllm or Hugging Face directory")
    parser.add_argument("dst", help="destination directory (must not exist, or be empty)")
    parser.add_argument("--to", choices=("hf", "fastllm"), default=None,
                        help="target format (default: fastllm for a Hugging Face source, else hf)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                        help="cast the weights (default: keep the stored dtype)")
    parser.add_argument("--max-shard-bytes", type=positive_int, default=None,
                        help="split Hugging Face safetensors into shards of at most this size")
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from fastllm.hf.api import DEFAULT_MAX_SHARD_BYTES, convert

    dtype = getattr(torch, args.dtype) if args.dtype else None
    written = convert(args.src, args.dst, to=args.to, dtype=dtype,
                      max_shard_bytes=args.max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    print(f"wrote {written} checkpoint to {args.dst}")
    return 0
