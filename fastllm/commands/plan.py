"""``fastllm plan RECIPE.py [key=value ...] [--gpus N --gpu-memory GiB]``: memory and communication
of a recipe's layout per rank, and the layouts of N GPUs that fit, ranked; no GPU needed."""

from __future__ import annotations

import argparse

from fastllm.cli import positive_int

__all__ = ["add_parser", "run"]


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a memory size in GiB > 0, got {text!r}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan", help="per-rank memory and communication of a layout, and the layouts that fit",
        description="Plan RECIPE.py's layout (with overrides) on an abstract mesh, without GPUs: per-rank "
                    "bytes of parameters, gradients, optimizer state, activations (with and without "
                    "recomputation) and temporary buffers, and the bytes each collective moves per step. "
                    "With --gpus, also rank every data x tensor layout and ZeRO stage of that many GPUs "
                    "that fits in --gpu-memory. See docs/performance.md.")
    parser.add_argument("recipe", help="a recipe file, e.g. recipes/smollm2_135m.py")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument("--gpus", type=positive_int, default=None, help="GPUs to search layouts over")
    parser.add_argument("--gpu-memory", type=_gib, default=80.0, help="memory per GPU in GiB (default 80)")
    parser.add_argument("--top", type=positive_int, default=8, help="layouts to list (default 8)")
    parser.add_argument("--target", choices=("cuda", "cpu"), default="cuda",
                        help="whose kernels to count activations for: a GPU's (Triton, fused attention; default) "
                             "or a CPU's (the torch references)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    import json

    from fastllm.train.memory import plan_memory, search_layouts
    from fastllm.train.recipes import load_train_recipe

    recipe, config = load_train_recipe(args.recipe, args.overrides)
    model = recipe.model(config) if hasattr(recipe, "model") else None
    plan = plan_memory(config, model, target=args.target)
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print(plan)
    if args.gpus:
        ranked = search_layouts(config, model, gpus=args.gpus, gpu_bytes=int(args.gpu_memory * 2**30))
        print()
        print(ranked.table(args.top))
    return 0
