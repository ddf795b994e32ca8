"""The Trainer's step timed alone: ``fastllm train RECIPE [overrides]`` run in this process with the
Trainer's ``train_step`` wrapped in a device synchronisation before and after each call.

    python benchmarks/step_time.py recipes/smollm2_135m.py --data DIR train.compile=true data.seq_len=2048 \
        train.batch_size=64 train.micro_batch_size=64

The median and fastest step of ``--window`` (steps after compilation), and the tokens/s and MFU
(DESIGN.md's FLOP formula, against an H100's dense bf16 peak) of the median step. Where two trees'
steps differ by a few milliseconds this is the number to compare: the Trainer's own tokens/s
(metrics.jsonl) also holds the wait for the next batch and whatever host work runs between steps.
Prints one JSON line.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]  # see train_vs_peer.py
sys.path.insert(0, str(HERE.parent))  # this tree's fastllm, not an installed one

_spec = importlib.util.spec_from_file_location("benchmarks_train_vs_peer", HERE / "train_vs_peer.py")
train_vs_peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_vs_peer)  # its train command (the quiet overrides, the warmup cut)


class TimedStep:
    """``step(state, batch)`` with the device synchronised around it; the seconds of each call."""

    def __init__(self, step, synchronize):
        self.step, self.synchronize, self.seconds = step, synchronize, []

    def __call__(self, state, batch):
        self.synchronize()
        start = time.perf_counter()
        out = self.step(state, batch)
        self.synchronize()
        self.seconds.append(time.perf_counter() - start)
        return out

    def __getattr__(self, name):  # the Trainer also reads the step's plan
        return getattr(self.step, name)


def timed_train(command: list[str]) -> tuple[list[float], object]:
    """Run ``fastllm train`` (``command``'s arguments after ``-m fastllm``) here; each step's seconds
    and the Trainer."""
    import torch

    from fastllm.cli import main as fastllm_main
    from fastllm.train import trainer as trainer_module

    original, made = trainer_module.Trainer.__init__, []
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.train_step = TimedStep(self.train_step, synchronize)
        made.append(self)

    trainer_module.Trainer.__init__ = init
    try:
        code = fastllm_main(command[command.index("fastllm") + 1:])
    finally:
        trainer_module.Trainer.__init__ = original
    if code or not made:
        raise SystemExit(f"step_time: fastllm train failed (exit {code})")
    return made[0].train_step.seconds, made[0]


def summary(seconds: list[float], window: tuple[int, int], tokens_per_step: int, flops_per_token) -> dict:
    """The window's (1-based, inclusive) median and fastest step; tokens/s and MFU of the median
    step (``tokens_per_step``: one GPU's share of the step's tokens)."""
    from fastllm.train.metrics import mfu

    first, last = window
    chosen = seconds[first - 1:last]
    median = statistics.median(chosen)
    tokens_per_s = tokens_per_step / median
    return {"steps": f"{first}-{last}", "step_ms_median": round(median * 1e3, 2), "step_ms_min": round(min(chosen) * 1e3, 2),
            "tokens_per_s_per_gpu": round(tokens_per_s, 1),
            "mfu": None if flops_per_token is None else float(f"{mfu(tokens_per_s, flops_per_token):.4g}")}


def main(argv=None) -> int:
    parser = train_vs_peer.recipe_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="steps in all (the first ones compile)")
    parser.add_argument("--window", default="11-30", help="FIRST-LAST steps timed (1-based)")
    args = parser.parse_intermixed_args(argv)
    window = train_vs_peer.step_range(parser, "--window", args.window, args.steps)
    import torch

    run_dir = Path(tempfile.mkdtemp(prefix="step_time-"))
    command = train_vs_peer.train_command(args.recipe, args.overrides, args.data, args.steps, args.steps, run_dir)
    seconds, trainer = timed_train(command)
    config = trainer.config
    tokens_per_step = config.train.batch_size * config.data.seq_len / trainer.mesh.world_size
    flops = trainer.model.flops_per_token(config.data.seq_len) if trainer.model.flops_per_token else None
    out = {"recipe": args.recipe, "overrides": args.overrides,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           **summary(seconds, window, tokens_per_step, flops),
           "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
