"""The Trainer: runs a config's training loop around the pure ``train_step``.

Everything with side effects lives here and nowhere in the step: reading data, moving batches to
the device, reporting (:class:`fastllm.train.reporting.RunLog`: the start-up block, ``metrics.jsonl``,
the console, TensorBoard, W&B, the profiler), validation, checkpoints and resume.
A checkpoint holds the full :class:`TrainState` (params, optimizer state, step, key), the data
loaders' positions and the config, so a resumed run continues bit for bit (on CPU, in fp32) where
an uninterrupted one would have been.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Optional

import torch

from fastllm import nn, optim, random
from fastllm.config import to_dict
from fastllm.sharding import Mesh, Partitioner
from fastllm.sharding import checkpoint as sharded_checkpoint
from fastllm.train import checkpointing
from fastllm.train.config import Config
from fastllm.train.data import build_loaders, tokenizer_path
from fastllm.train.metrics import Throughput, mfu
from fastllm.train.optimizer import build_optimizer
from fastllm.train.reporting import RunLog
from fastllm.train.state import TrainState
from fastllm.train.step import EvalStep, TrainStep

__all__ = ["Trainer", "TrainResult", "resolve_device", "default_model", "mesh_from_config", "partitioner_from_config"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name!r} but no CUDA device is available")
    return device


def default_model(config: Config) -> nn.Model:
    """The model a config's ``model`` section describes: the built-in decoder of a preset."""
    from fastllm import models

    model_config = config.model_config
    if not isinstance(model_config, models.ModelConfig):
        raise TypeError(f"config.model is a {type(model_config).__name__}: pass the model to train "
                        "(a recipe's model(config) function, or Trainer(config, model=...))")
    return models.model(model_config)


def mesh_from_config(config: Config) -> Mesh:
    """``config.mesh``'s grid over the processes torchrun started (one process: a mesh of one on
    ``run.device``)."""
    from fastllm.train.launch import check_launch

    check_launch(config)  # versions, world size against the mesh, GPUs per node: one line each
    m = config.mesh
    return Mesh.from_env(data=m.data, tensor=m.tensor, pipe=m.pipe, device=resolve_device(config.run.device))


def partitioner_from_config(config: Config, mesh: Mesh) -> Partitioner:
    return Partitioner(mesh, rules=config.mesh.rules_table(), zero_stage=config.zero.stage,
                       transport=config.zero.transport)


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
    """``Trainer(config).run()``. ``model``: an :class:`fastllm.nn.Model` (default: the built-in
    decoder of ``config.model``); ``train_data``/``val_data`` override the loaders the config's
    ``data`` section would build (each: an iterator of batch dicts with ``state_dict()`` and
    ``load_state_dict()``); ``mesh``: a :class:`fastllm.sharding.Mesh` (default: ``config.mesh``
    over torchrun's processes, or one process). One path for every layout: a single process is a
    mesh of one."""

    def __init__(self, config: Config, *, model: Optional[nn.Model] = None, train_data=None, val_data=None,
                 mesh: Optional[Mesh] = None):
        self.config = config
        self.model = default_model(config) if model is None else model
        self.mesh = mesh_from_config(config) if mesh is None else mesh
        self.partitioner = partitioner_from_config(config, self.mesh)
        self.device = self.mesh.device
        t = config.train
        data_ranks = self.mesh.size("data")
        self.micro_batch_size, self.grad_accum = t.micro_batch(data_ranks), t.grad_accum(data_ranks)
        self.optimizer, self.schedule = build_optimizer(config, clip=False)  # the step clips over all shards
        self.train_step = TrainStep(self.model, self.partitioner, self.optimizer, grad_accum=self.grad_accum,
                                    precision=t.precision, max_grad_norm=t.grad_clip, learning_rate=self.schedule,
                                    remat=t.remat == "block", compile=t.compile)
        self.eval_step = EvalStep(self.model, self.partitioner, precision=t.precision)
        self.is_main = self.mesh.global_rank == 0
        if train_data is None:
            train_data, built_val = build_loaders(config, micro_batch_size=self.micro_batch_size,
                                                  dp_rank=self.mesh.rank("data"), dp_size=data_ranks)
            val_data = built_val if val_data is None else val_data
        self.train_data, self.val_data = train_data, val_data
        # Validation always reads the same batches, from the validation loader's starting position.
        self._val_start = None if val_data is None else val_data.state_dict()

    # -- state -------------------------------------------------------------------------------
    def init_state(self) -> TrainState:
        """This rank's initial state: its shards only, each the slice of the one-process init."""
        t, loss_scale = self.config.train, None
        if t.precision == "fp16":
            loss_scale = optim.dynamic_loss_scale(t.loss_scale, t.loss_scale_growth_interval, device=self.device)
        return self.train_step.init_state(random.key(self.config.run.seed), loss_scale=loss_scale)

    def fresh_state(self) -> TrainState:
        """The state a run without a checkpoint starts from: initialised, with ``run.init_from``'s
        weights when the config names a model to start from."""
        state = self.init_state()
        if self.config.run.init_from:
            from fastllm.train.warm_start import copy_initial_params

            copy_initial_params(state.params, self.config.run.init_from, self.train_step.plan, self.mesh)
        return state

    def restore(self) -> Optional[TrainState]:
        """The newest checkpoint's state (loaders repositioned), or ``None`` when there is none."""
        found = checkpointing.latest(self.run_dir)
        if found is None:
            return None
        template = self.init_state()
        state, extra = checkpointing.load(found, template, device=self.device, **self._mesh_args(template))
        if extra.get("config") != to_dict(self.config):
            self._say(f"note: resuming from {found}, written with a different config (run.resume=false starts afresh)")
        self._say(f"resuming from {found} at step {state.step}")
        self.train_data.load_state_dict(extra["data"]["train"])
        return state

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run.dir)

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
        """The spec trees and mesh of the (sharded) checkpoint: every rank writes its shards, and a
        checkpoint loads onto any mesh, one process included."""
        plan = self.train_step.plan
        specs = {"params": plan.params, "opt_state": sharded_checkpoint.state_specs(state.opt_state, plan.opt_state)}
        if state.loss_scale is not None:
            specs["loss_scale"] = sharded_checkpoint.state_specs(state.loss_scale, plan.params)
        return {"specs": specs, "mesh": self.mesh}

    def _say(self, text: str) -> None:
        if self.is_main:
            print(text)

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
        if not self.is_main:  # one rank writes the run's files
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
        state = state if resumed else self.fresh_state()
        log = RunLog(self, state.step, resumed)
        last = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
        result = TrainResult(state)
        flops = self.model.flops_per_token(cfg.data.seq_len) if self.model.flops_per_token else None
        meter = Throughput(self.device)
        saved_at = state.step if resumed else None
        while state.step < last:
            log.before_step(state.step + 1)
            batch = self._batch(self.train_data)
            state, metrics = self.train_step(state, batch)
            log.after_step(state.step)
            meter.add(batch["tokens"].numel())
            step = state.step
            if step % cfg.train.log_every == 0 or step == last:
                record = self._record(step, metrics, meter.measure(), flops)
                result.history.append(log.write(record))
            if self.val_data is not None and _due(step, cfg.train.eval_every, last):
                result.history.append(log.write({"step": step, "val_loss": self.evaluate(state.params)}))
            if _due(step, cfg.train.checkpoint_every, last):
                self.save(state)
                saved_at = step
        log.close()
        if saved_at != state.step:
            self.save(state)
        result.state = state
        return result

    def _record(self, step: int, metrics: dict, tokens_per_s: float, flops: Optional[float]) -> dict:
        record = {"step": step, **{name: value.item() for name, value in metrics.items()}}
        record["tokens_per_s"] = tokens_per_s
        if self.device.type == "cuda" and flops is not None:
            # tokens_per_s counts this data rank's tokens, which its tensor (and pipe) ranks share
            record["mfu"] = mfu(tokens_per_s / (self.mesh.size("tensor") * self.mesh.size("pipe")), flops)
        return record


def _due(step: int, every: int, last: int) -> bool:
    """Periodic events fire every ``every`` steps and always at the last step."""
    return step == last or (every > 0 and step % every == 0)


