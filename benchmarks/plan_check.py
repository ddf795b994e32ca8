"""The planner against a GPU's measured peak: ``fastllm plan``'s per-rank total beside
``torch.cuda.max_memory_allocated`` of real train steps, one JSON line per case.

    python benchmarks/plan_check.py                 # both cases on one GPU; exit status 1 if one is off by > 10%
    python benchmarks/plan_check.py --case smollm2  # one case
    python benchmarks/plan_check.py --cpu-smoke     # the script's own code on CPU, tiny shapes

Cases (one process, the recipe's precision and recomputation):
* ``smollm2``: recipes/smollm2_135m.py as it is (bf16, 8 x 2048-token micro-batches, 4-step accumulation);
* ``llama8b-4l``: recipes/llama3_8b.py on one GPU with the Llama-3.1-8B shape cut to 4 layers
  (``model.preset=llama3.1-8b model.n_layers=4 mesh.data=1 zero.stage=0 train.batch_size=2``:
  bf16, block recomputation, 1 x 8192-token micro-batches, 2-step accumulation).

Each case trains ``--steps`` steps on random token ids with the Trainer's own TrainStep; the peak is
measured over the last step (the first ones settle the allocator), from the memory allocated
before it (params, optimizer state) up, so it is comparable with the plan's total.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastllm import random  # noqa: E402
from fastllm.config import load_recipe  # noqa: E402
from fastllm.sharding import Mesh  # noqa: E402
from fastllm.train.memory import plan_memory  # noqa: E402
from fastllm.train.optimizer import build_optimizer  # noqa: E402
from fastllm.train.step import TrainStep  # noqa: E402
from fastllm.train.trainer import default_model, partitioner_from_config  # noqa: E402

CASES = {
    "smollm2": ("recipes/smollm2_135m.py", []),
    "llama8b-4l": ("recipes/llama3_8b.py", ["model.preset=llama3.1-8b", "model.n_layers=4", "mesh.data=1",
                                            "zero.stage=0", "train.batch_size=2"]),
}
SMOKE = ["model.n_layers=2", "model.embed_dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
         "model.mlp_dim=128", "model.vocab_size=512", "data.seq_len=64", "train.precision=fp32"]


def measure(config, device: torch.device, steps: int) -> int:
    """Peak bytes allocated on ``device`` over the last of ``steps`` train steps."""
    model = default_model(config)
    partitioner = partitioner_from_config(config, Mesh.local(device))
    optimizer, schedule = build_optimizer(config, clip=False)
    t = config.train
    step = TrainStep(model, partitioner, optimizer, grad_accum=t.grad_accum(1), precision=t.precision,
                     max_grad_norm=t.grad_clip, learning_rate=schedule, remat=t.remat == "block")
    state = step.init_state(random.key(0))
    rows, vocab = t.batch_size, config.model_config.vocab_size
    batch = {"tokens": torch.randint(0, vocab, (rows, config.data.seq_len), device=device),
             "targets": torch.randint(0, vocab, (rows, config.data.seq_len), device=device),
             "segment_ids": torch.zeros(rows, config.data.seq_len, dtype=torch.long, device=device)}
    for index in range(steps):
        if index == steps - 1 and device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        state, metrics = step(state, batch)
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="default: every case")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (no measurement)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    failed = False
    for name in args.case or sorted(CASES):
        recipe, overrides = CASES[name]
        _, config = load_recipe(ROOT / recipe, overrides + (SMOKE if args.cpu_smoke else []) + ["run.device=" + device.type])
        plan = plan_memory(config)
        measured = measure(config, device, args.steps)
        ratio = plan.total / measured if measured else None
        failed |= ratio is not None and abs(ratio - 1) > args.tolerance
        print(json.dumps({"case": name, "planned_gib": plan.total / 2**30, "measured_gib": measured / 2**30,
                          "ratio": ratio, "planned": {k: v / 2**30 for k, v in plan.rows().items()},
                          "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}),
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
