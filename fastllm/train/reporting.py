"""A run's reporting: the start-up block, ``metrics.jsonl``, the console, TensorBoard, W&B and the
profiler, behind the one ``write(record)`` the Trainer calls.

The start-up block says, before the first step, what will run and where its files go: the model
and its parameter count, the layout, the global batch and tokens per step, the run directory, the
checkpoint and metrics paths, and the step the run starts (or resumes) from. Only rank 0 prints;
every other rank keeps its own ``metrics.rank<N>.jsonl`` and is silent.
"""

from __future__ import annotations

import math
import resource
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from fastllm import nn, tree
from fastllm.train.console import Console, number
from fastllm.train.metrics import MetricsLog
from fastllm.train.sinks import Profiler, build_sinks

__all__ = ["RunLog", "startup_lines", "peak_memory_gib"]


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far: allocated GPU memory on CUDA, resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return peak_kib * (1 if sys.platform == "darwin" else 1024) / 2**30


def _model_name(config: Any, model: nn.Model) -> str:
    section = config.model
    preset = getattr(section, "preset", None)
    if preset is not None:
        return f"{preset} ({config.model_config.family})"
    return type(section).__name__


def _start(cfg: Any, start_step: int, resumed_from: Optional[Path]) -> str:
    if resumed_from is not None:
        return f"resumes from step {start_step} ({resumed_from})"
    if cfg.run.init_from:
        return f"starts from step 0 with the weights of {cfg.run.init_from}"
    return "starts from step 0 (no checkpoint)"


def _layout(trainer: Any) -> str:
    cfg, mesh = trainer.config, trainer.mesh
    axes = " x ".join(f"{axis}={mesh.size(axis)}" for axis in ("data", "tensor", "pipe"))
    processes = f"{mesh.world_size} process{'es' if mesh.world_size > 1 else ''}"
    remat = ", recomputing blocks" if cfg.train.remat == "block" else ""
    return f"{axes} ({processes}) on {trainer.device.type}, ZeRO stage {cfg.zero.stage}, {cfg.train.precision}{remat}"


def startup_lines(trainer: Any, start_step: int, resumed_from: Optional[Path]) -> list[str]:
    """The start-up block of ``trainer`` (a :class:`fastllm.train.Trainer`) as lines of text."""
    cfg, run_dir = trainer.config, trainer.run_dir
    params = sum(math.prod(p.shape) for p in tree.leaves(trainer.train_step.plan.declarations, is_leaf=nn.is_param))
    seq, batch, every = cfg.data.seq_len, cfg.train.batch_size, cfg.train.checkpoint_every
    when = f"every {every} steps and at the end" if every else "at the end"
    return [
        f"fastllm: {_model_name(cfg, trainer.model)}, {params:,} parameters ({params / 1e6:.2f}M)",
        f"  layout      {_layout(trainer)}",
        f"  batch       {batch} sequences x {seq} tokens = {batch * seq:,} tokens per step "
        f"(micro-batch {trainer.micro_batch_size} x {trainer.grad_accum} per data rank)",
        f"  steps       {cfg.train.steps}; run {_start(cfg, start_step, resumed_from)}",
        f"  run dir     {run_dir}",
        f"  checkpoints {run_dir / 'checkpoints'} ({when})",
        f"  metrics     {run_dir / 'metrics.jsonl'} (every {cfg.train.log_every} steps)",
    ]


class RunLog:
    """``write(record)`` to every place a run's records go; ``before_step``/``after_step`` drive the
    profiler; ``close()`` at the end. Built by the Trainer once the start state is known."""

    def __init__(self, trainer: Any, start_step: int, resumed: bool):
        cfg, run_dir = trainer.config, trainer.run_dir
        self.device, self.main = trainer.device, trainer.is_main
        name = "metrics.jsonl" if self.main else f"metrics.rank{trainer.mesh.global_rank}.jsonl"
        self.metrics = MetricsLog(run_dir / name, start_step=start_step)
        self.console = Console(cfg.train.steps, start_step, mode=cfg.run.progress, enabled=self.main)
        self.sinks = build_sinks(cfg, run_dir, resumed=resumed) if self.main else []
        first_last = cfg.log.profile_steps
        self.profiler = Profiler(run_dir, *first_last) if first_last and self.main else None
        if self.main:
            from fastllm.train import checkpointing

            lines = startup_lines(trainer, start_step, checkpointing.latest(run_dir) if resumed else None)
            lines += [f"  {type(sink).__name__.removesuffix('Sink').lower():<11} {sink.directory}" for sink in self.sinks]
            if self.profiler is not None:
                lines.append(f"  profile     steps {first_last[0]}-{first_last[1]} to {self.profiler.directory}")
            for line in lines:
                self.console.say(line)

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Log ``record`` everywhere (a training record gains ``memory_gib``); returns the logged line."""
        if "loss" in record:
            record = {**record, "memory_gib": peak_memory_gib(self.device)}
        line = self.metrics.write(record)
        for sink in self.sinks:
            sink.write(line)
        if "loss" in line:
            self.console.update(line)
        elif "val_loss" in line:
            self.console.say(f"step {line['step']}: validation loss {number(line['val_loss'], '.4f')}")
        return line

    def before_step(self, step: int) -> None:
        if self.profiler is not None:
            self.profiler.before(step)

    def after_step(self, step: int) -> None:
        if self.profiler is not None and (path := self.profiler.after(step)) is not None:
            self.console.say(f"wrote a profiler trace of steps {self.profiler.first}-{step} to {path}")

    def close(self) -> None:
        self.console.close()
        for sink in self.sinks:
            sink.close()
