"""The Trainer: runs a config's training loop around the pure ``train_step``.

Everything with side effects lives here and nowhere in the step: reading data, moving batches to
the device, logging ``metrics.jsonl`` and the progress bar, validation, checkpoints and resume.
A checkpoint holds the full :class:`TrainState` (params, optimizer state, step, key), the data
loaders' positions and the config, so a resumed run continues bit for bit (on CPU, in fp32) where
an uninterrupted one would have been.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from fastllm import models, random
from fastllm.config import to_dict
from fastllm.train import checkpointing
from fastllm.train import sharded
from fastllm.train.config import Config
from fastllm.train.data import build_loaders, tokenizer_path
from fastllm.train.metrics import MetricsLog, Throughput, mfu
from fastllm.train.optimizer import build_optimizer
from fastllm.train.progress import ProgressBar
from fastllm.train.state import TrainState
from fastllm.train.step import make_eval_step, make_train_step

__all__ = ["Trainer", "TrainResult", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name!r} but no CUDA device is available")
    return device


@dataclass
class TrainResult:
    state: TrainState
    history: list[dict[str, Any]] = field(default_factory=list)  # every logged record

    @property
    def final_loss(self) -> float:
        losses = [r["loss"] for r in self.history if "loss" in r]
        return losses[-1] if losses else math.nan

    @property
    def val_loss(self) -> Optional[float]:
        losses = [r["val_loss"] for r in self.history if "val_loss" in r]
        return losses[-1] if losses else None


class Trainer:
    """``Trainer(config).run()``. ``train_data``/``val_data`` override the loaders the config's
    ``data`` section would build (each: an iterator of batch dicts with ``state_dict()`` and
    ``load_state_dict()``). ``mesh``: a :class:`fastllm.sharding.Mesh` (default: built from
    ``config.mesh`` under torchrun); with more than one rank the steps run on shards."""

    def __init__(self, config: Config, *, train_data=None, val_data=None, mesh=None):
        self.config = config
        self.model_config = config.model_config
        self.run_dir = Path(config.run.dir)
        self.device = resolve_device(config.run.device)
        # partitioner: a mesh of more than one rank trains on shards (fastllm.train.sharded)
        self.partitioner = sharded.partitioner_from_config(config, mesh)
        self.mesh = mesh if self.partitioner is None else self.partitioner.mesh
        if self.partitioner is not None:
            self.device = self.partitioner.mesh.device
            self.optimizer, self.schedule = build_optimizer(config, clip=False)
            self.train_step, self.eval_step = sharded.build_steps(config, self.partitioner, self.optimizer, self.schedule)
        else:
            self.optimizer, self.schedule = build_optimizer(config)
            t = config.train
            self.train_step = make_train_step(
                self.model_config, self.optimizer, grad_accum=t.grad_accum, precision=t.precision,
                remat=t.remat, learning_rate=self.schedule, compile=t.compile,
            )
            self.eval_step = make_eval_step(self.model_config, precision=t.precision)
        self.is_main = sharded.is_main_rank()
        if train_data is None:
            dp = {} if self.partitioner is None else dict(
                dp_rank=self.partitioner.mesh.rank("data"), dp_size=self.partitioner.mesh.size("data"))
            train_data, built_val = build_loaders(config, **dp)
            val_data = built_val if val_data is None else val_data
        self.train_data, self.val_data = train_data, val_data
        # Validation always reads the same batches, from the validation loader's starting position.
        self._val_start = None if val_data is None else val_data.state_dict()

    # -- state -------------------------------------------------------------------------------
    def init_state(self) -> TrainState:
        if self.partitioner is not None:  # partitioner: each rank initialises its shards only
            return sharded.init_state(self.config, self.partitioner, self.optimizer)
        key = random.key(self.config.run.seed)
        params = models.init(self.model_config, random.fold_in(key, "params"), device=self.device)
        loss_scale = None
        if self.config.train.precision == "fp16":
            from fastllm import optim

            loss_scale = optim.dynamic_loss_scale(
                self.config.train.loss_scale, self.config.train.loss_scale_growth_interval, device=self.device
            )
        return TrainState(params, self.optimizer.init(params), 0, random.fold_in(key, "train"), loss_scale)

    def restore(self) -> Optional[TrainState]:
        """The newest checkpoint's state (loaders repositioned), or ``None`` when there is none."""
        found = checkpointing.latest(self.run_dir)
        if found is None:
            return None
        template = self.init_state()
        state, extra = checkpointing.load(found, template, device=self.device, **self._mesh_args(template))
        if extra.get("config") != to_dict(self.config):
            print(f"note: resuming from {found}, written with a different config (run.resume=false starts afresh)")
        print(f"resuming from {found} at step {state.step}")
        self.train_data.load_state_dict(extra["data"]["train"])
        return state

    def save(self, state: TrainState) -> Path:
        extra = {
            "config": to_dict(self.config),
            "data": {"train": self.train_data.state_dict()},
        }
        path = checkpointing.save(self.run_dir, state, extra, **self._mesh_args(state))
        if self.is_main:  # one pruner: the others' next save cannot start before this returns
            checkpointing.prune(self.run_dir, keep=self.config.train.keep_checkpoints)
        return path

    def _mesh_args(self, state: TrainState) -> dict:
        """Under a mesh, the spec trees and mesh of a sharded checkpoint (every rank its shards)."""
        if self.partitioner is None:
            return {}
        return {"specs": sharded.checkpoint_specs(self.config, self.partitioner, state), "mesh": self.partitioner.mesh}

    # -- loop --------------------------------------------------------------------------------
    def _batch(self, source: Iterator) -> dict:
        return {name: value.to(self.device, non_blocking=True) for name, value in next(source).items()}

    def evaluate(self, params) -> float:
        """Mean validation loss over ``train.eval_batches`` micro-batches, weighted by valid tokens."""
        self.val_data.load_state_dict(self._val_start)
        total = weight = 0.0
        for _ in range(self.config.train.eval_batches):
            metrics = self.eval_step(params, self._batch(self.val_data))
            total += metrics["loss"].item() * metrics["tokens"].item()
            weight += metrics["tokens"].item()
        return total / max(weight, 1.0)

    def _prepare_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.is_main:  # partitioner: one rank writes the run's files
            return
        (self.run_dir / "config.json").write_text(json.dumps(to_dict(self.config), indent=2) + "\n")
        tokenizer = tokenizer_path(self.config) if self.config.data.datasets else None
        if tokenizer is not None:
            shutil.copyfile(tokenizer, self.run_dir / "tokenizer.json")  # generate/export find it here

    def run(self, *, stop_at: Optional[int] = None) -> TrainResult:
        """Train to ``train.steps`` (or stop, with a checkpoint, after step ``stop_at``)."""
        cfg = self.config
        self._prepare_run_dir()
        state = self.restore() if cfg.run.resume else None
        resumed = state is not None
        state = state if resumed else self.init_state()
        log_name = "metrics.jsonl" if self.is_main else f"metrics.rank{self.mesh.global_rank}.jsonl"
        log = MetricsLog(self.run_dir / log_name, resume_step=state.step if resumed else None)
        last = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
        result = TrainResult(state)
        bar = ProgressBar(cfg.train.steps, start=state.step, enabled=_progress_enabled(cfg.run.progress) if self.is_main else False)
        flops = models.flops_per_token(self.model_config, cfg.data.seq_len)
        meter = Throughput(self.device)
        saved_at = state.step if resumed else None
        while state.step < last:
            batch = self._batch(self.train_data)
            state, metrics = self.train_step(state, batch)
            meter.add(batch["tokens"].numel())
            step = state.step
            if step % cfg.train.log_every == 0 or step == last:
                record = self._record(step, metrics, meter.measure(), flops)
                result.history.append(log.write(record))
                bar.update(step, record["loss"], record["tokens_per_s"])
            if self.val_data is not None and _due(step, cfg.train.eval_every, last):
                result.history.append(log.write({"step": step, "val_loss": self.evaluate(state.params)}))
            if _due(step, cfg.train.checkpoint_every, last):
                self.save(state)
                saved_at = step
        bar.close()
        if saved_at != state.step:
            self.save(state)
        result.state = state
        return result

    def _record(self, step: int, metrics: dict, tokens_per_s: float, flops: float) -> dict:
        record = {"step": step, **{name: value.item() for name, value in metrics.items()}}
        record["tokens_per_s"] = tokens_per_s
        if self.device.type == "cuda":
            record["mfu"] = mfu(tokens_per_s, flops)
        return record


def _due(step: int, every: int, last: int) -> bool:
    """Periodic events fire every ``every`` steps and always at the last step."""
    return step == last or (every > 0 and step % every == 0)


def _progress_enabled(mode: str) -> Optional[bool]:
    return None if mode == "auto" else mode == "on"

