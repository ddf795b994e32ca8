"""One GPU: ``fastllm train RECIPE [overrides]`` beside a peer of the same shape; one JSON line each.

    python benchmarks/train_vs_peer.py recipes/smollm2_135m.py --data DIR train.compile=true
    python benchmarks/train_vs_peer.py recipes/llama3_8b.py --data DIR model.n_layers=4 mesh.data=1 zero.stage=0 train.batch_size=2
    python benchmarks/train_vs_peer.py recipes/llama3_8b.py --data DIR model.preset=tiny-llama model.vocab_size=8192 \
        data.seq_len=128 train.batch_size=4 mesh.data=1 zero.stage=0 --steps 4 --log-every 2 --warmup 1
                                                                        # CPU smoke test (DIR of vocabulary <= 8192)

``DIR``: tokens prepared by ``fastllm prepare`` (the recipe's tokenizer vocabulary or smaller).

* **fastllm** is the user's path, unchanged: ``python -m fastllm train`` in a subprocess on the
  recipe with the overrides, ``data.datasets=DIR``, ``--steps`` steps, a metrics line every
  ``--log-every`` steps, no validation, no sample, no HF export, no final checkpoint, a fresh run
  directory; a recipe's warmup that would outlast the run is cut to a quarter of it. Its numbers
  are what the Trainer logs (``metrics.jsonl``): tokens/s over each logged window (the first window,
  which compiles, is left out), MFU, peak memory, losses.
* **peer** is benchmarks/llama_8b.py's (or, for a mixture of experts, benchmarks/mixtral.py's):
  transformers' model of the recipe's shape, each decoder layer ``torch.compile``d, FSDP2 with bf16
  parameters and fp32 reduction, fused AdamW, SDPA; the recipe's micro-batch and sequence length on
  random tokens, timed by ``llama_8b.measure`` (median of ``--steps`` after ``--warmup``).

Both print tokens/s/GPU, step time, MFU (``fastllm.models.flops_per_token``, DESIGN.md, against
989 TFLOP/s), peak memory and first and last loss, so that one call compares them on one machine.
``--variant "key=value ..."`` (repeatable) adds a fastllm run with those overrides on top (an
option such as ``model.kernels.matmul=fp8`` beside the plain run); a last line gives each fastllm
run's tokens/s over the fastest peer's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Python put this script's folder first on sys.path: benchmarks/kernels.py would then stand for the
# ``kernels`` package that transformers looks for.
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]

QUIET = ["train.eval_every=0", "data.validation_fraction=0", "train.checkpoint_every=0", "train.checkpoint_minutes=0",
         "train.final_checkpoint=false",
         "run.progress=off", "run.resume=false", "run.export_hf=false", "sample.prompt=", "sample.max_new_tokens=0"]


def recipe_parser(description: str) -> argparse.ArgumentParser:
    """A benchmark's command line over a recipe: the recipe, fastllm train's overrides and ``--data``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value, as fastllm train takes them")
    parser.add_argument("--data", required=True, help="prepared tokens (fastllm prepare)")
    return parser


def step_range(parser: argparse.ArgumentParser, flag: str, text: str, steps: int) -> tuple[int, int]:
    """``FIRST-LAST`` (1-based, inclusive) within ``steps``, or the parser's one-line error naming ``flag``."""
    match = re.fullmatch(r"(\d+)-(\d+)", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]) <= steps:
        parser.error(f"{flag} {text}: want FIRST-LAST with 1 <= FIRST <= LAST <= --steps")
    return int(match[1]), int(match[2])


def parse_args(argv=None) -> argparse.Namespace:
    parser = recipe_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--system", choices=("fastllm", "peer", "both"), default="both")
    parser.add_argument("--steps", type=int, default=40, help="steps of each system (fastllm: in all)")
    parser.add_argument("--log-every", type=int, default=10, help="fastllm's metrics window")
    parser.add_argument("--warmup", type=int, default=3, help="the peer's unmeasured first steps")
    parser.add_argument("--peer-loss", default="ce", help="the dense peer's losses, comma-separated: ce (logits, "
                        "then cross-entropy), flce (Liger's fused linear cross-entropy); each is one peer run")
    parser.add_argument("--variant", action="append", default=[], metavar="OVERRIDES",
                        help="one more fastllm run with these space-separated overrides on top (repeatable)")
    return parser.parse_intermixed_args(argv)


def train_command(recipe: str, overrides: list[str], data: str, steps: int, log_every: int, run_dir: Path) -> list[str]:
    """``python -m fastllm train`` on the recipe for a measurement: ``steps`` steps on ``data``, a
    metrics line every ``log_every``, nothing else written; a recipe's warmup that would outlast
    the run is cut to a quarter of it."""
    from fastllm.config import load_recipe

    overrides = list(overrides)
    if load_recipe(recipe, overrides)[1].optim.warmup_steps >= steps:
        overrides.append(f"optim.warmup_steps={max(1, steps // 4)}")
    return [sys.executable, "-m", "fastllm", "train", recipe, *overrides, f"data.datasets={data}",
            f"train.steps={steps}", f"train.log_every={log_every}", *QUIET, f"run.dir={run_dir}"]


def fastllm_run(args, variant: tuple[str, ...] = ()) -> dict:
    """``fastllm train`` as a user runs it (the overrides, then ``variant``'s); the numbers its metrics log holds."""
    run_dir = Path(tempfile.mkdtemp(prefix="train_vs_peer-"))
    command = train_command(args.recipe, [*args.overrides, *variant], args.data, args.steps, args.log_every, run_dir)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}"}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    logged = [r for r in records if "tokens_per_s" in r]
    timed = logged[1:] or logged  # the first window compiles
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in timed)
    config = json.loads((run_dir / "config.json").read_text())
    world = config["mesh"]["data"] * config["mesh"]["tensor"] * config["mesh"]["pipe"]
    step_tokens = config["train"]["batch_size"] * config["data"]["seq_len"]
    out = {"tokens_per_s_per_gpu": round(tokens_per_s / world, 1), "step_time_s": round(step_tokens / tokens_per_s, 4),
           "mfu": round(statistics.median(r["mfu"] for r in timed), 4) if "mfu" in timed[0] else None,
           "peak_memory_gib": round(max((r.get("memory_gib") or 0) for r in logged), 2) or None,
           "first_loss": logged[0]["loss"], "last_loss": logged[-1]["loss"], "windows": len(timed),
           "command": " ".join(command[1:])}
    return out


def sibling(name: str):
    """benchmarks/<name>.py as a module (its folder is not on sys.path, see above), loaded once and
    registered in ``sys.modules`` (dataclasses look their module up there)."""
    key = f"benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        sys.modules[key] = module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]


def peer_run(args, loss: str = "ce") -> dict:
    """The peer of the recipe's shape (one process); ``loss`` as ``--peer-loss`` names it."""
    import torch.distributed as dist

    from fastllm.config import load_recipe

    llama_8b = sibling("llama_8b")

    _, config = load_recipe(args.recipe, args.overrides)
    model_config, seq_len = config.model_config, config.data.seq_len
    bench = SimpleNamespace(micro_batch=config.train.micro_batch(1), seq_len=seq_len, steps=args.steps,
                            warmup=args.warmup, sync_every=1, lr=config.optim.lr, compile=True, peer_ac=False,
                            peer_loss=loss, peer_experts="grouped_mm", profile=None)
    device = llama_8b.setup()
    try:
        if model_config.moe is not None:
            mixtral = sibling("mixtral")
            build = lambda: mixtral.build_peer(bench, config, device)[0]  # noqa: E731
        elif model_config.family == "llama":
            build = lambda: llama_8b.build_peer_step(bench, model_config, device)  # noqa: E731
        else:
            raise ValueError(f"no peer here for the {model_config.family} family (llama and mixtral shapes)")
        out = llama_8b.measure("peer", build, bench, model_config, device)
    finally:
        dist.destroy_process_group()
    losses = out.pop("losses")
    return {**out, "first_loss": losses[0], "last_loss": losses[-1]}


def runs(args) -> list[tuple[str, tuple[str, ...], str | None]]:
    """(system, extra overrides, peer loss) of each run ``args`` asks for, in order."""
    ours = [("fastllm", (), None)] + [("fastllm", tuple(v.split()), None) for v in args.variant]
    peers = [("peer", (), loss) for loss in args.peer_loss.split(",")]
    return {"both": ours + peers, "fastllm": ours, "peer": peers}[args.system]


def ratios(rows: list[dict]) -> dict[str, float]:
    """Each fastllm run's tokens/s over the fastest peer's (keyed by its variant, "" for the plain run)."""
    peers = [r["tokens_per_s_per_gpu"] for r in rows if r["system"] == "peer" and "tokens_per_s_per_gpu" in r]
    if not peers:
        return {}
    return {r.get("variant", ""): round(r["tokens_per_s_per_gpu"] / max(peers), 3)
            for r in rows if r["system"] == "fastllm" and "tokens_per_s_per_gpu" in r}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("FASTLLM_TYPECHECK", "0")
    rows = []
    for system, variant, loss in runs(args):
        try:
            fields = fastllm_run(args, variant) if system == "fastllm" else {"loss": loss, **peer_run(args, loss)}
        except Exception as error:  # noqa: BLE001 - report, go on with the other system
            fields = {"error": f"{type(error).__name__}: {error}"}
        row = {"system": system, "recipe": args.recipe, "overrides": args.overrides,
               **({"variant": " ".join(variant)} if variant else {}), **fields}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if found := ratios(rows):
        print(json.dumps({"ratio_to_fastest_peer": found}), flush=True)
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
