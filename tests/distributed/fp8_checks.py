"""FP8 projections under layouts, run inside spawned gloo ranks (see test_fp8_layouts.py).

A scale is per tensor of one call, i.e. of one rank's block (its rows under ``data``, its columns or
rows of a weight under ``tensor``), so a layout agrees with one process within FP8 rounding, not
bf16 rounding. Each rank runs one process's FP8 training itself (on the whole batch) and the layout's,
and reports the number of ``fp8_linear`` calls per forward and the worst relative difference of the
losses over the steps.
"""

from __future__ import annotations

import importlib

from fastllm import models, random
from fastllm.kernels import KernelConfig
from fastllm.sharding import COMPUTE_RULES, Mesh, Partitioner
from fastllm.train.step import TrainStep
from partitioner_checks import adamw, batches, run_steps

OPS = importlib.import_module("fastllm.nn.ops")
LAYOUTS = {"data2_zero1": (dict(data=2), 1, COMPUTE_RULES),
           "tensor2_sp": (dict(tensor=2), 0, COMPUTE_RULES.replace("seq", "tensor"))}


def _losses(config, mesh: Mesh, zero_stage: int, rules) -> list[float]:
    step = TrainStep(models.model(config), Partitioner(mesh, rules=rules, zero_stage=zero_stage), adamw(),
                     max_grad_norm=0.5)
    return run_steps(step, step.init_state(random.key(0)), batches(config), mesh)[1]


def fp8_layouts() -> dict[str, dict]:
    """``{layout: {"calls": fp8_linear calls of one step, "worst": max relative loss difference}}``."""
    config = models.preset("tiny-llama", kernels=KernelConfig(matmul="fp8"))
    calls, linear = [], OPS.fp8_linear
    OPS.fp8_linear = lambda x, w: calls.append(1) or linear(x, w)
    one = _losses(config, Mesh.local(), 0, COMPUTE_RULES)
    report = {}
    for name, (sizes, zero_stage, rules) in LAYOUTS.items():
        calls.clear()
        layout = _losses(config, Mesh(**{"data": 1, "tensor": 1, **sizes}), zero_stage, rules)
        worst = max(abs(a - b) / abs(b) for a, b in zip(layout, one))
        report[name] = {"calls": len(calls) // len(one), "worst": worst}
    return report
