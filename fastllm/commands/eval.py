"""``fastllm eval CHECKPOINT --data DIR``: loss and perplexity of a model on held-out data."""

from __future__ import annotations

import argparse

from fastllm.cli import positive_int

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval", help="loss and perplexity of a checkpoint on a prepared dataset",
        description="Evaluate CHECKPOINT (a run directory, a training checkpoint, a fastllm or a Hugging Face "
                    "directory) on a dataset prepared with `fastllm prepare`: mean loss per target token and "
                    "its perplexity, printed as one JSON line.")
    parser.add_argument("checkpoint", help="run, checkpoint, fastllm or Hugging Face model directory")
    parser.add_argument("--data", required=True, help="a prepared dataset directory (held-out text)")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="tokens per sequence (default: the model's max_seq_len, at most 1024)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per batch (default 8)")
    parser.add_argument("--batches", type=positive_int, default=None,
                        help="evaluate at most this many batches (default: the whole dataset once)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    return parser


def run(args: argparse.Namespace) -> int:
    import json

    from fastllm.evaluation.perplexity import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                                 max_batches=args.batches, device=args.device)
    print(json.dumps(result.as_dict()))
    return 0
