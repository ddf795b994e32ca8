"""The Trainer: runs a config's training loop around the pure ``train_step``.

Everything with side effects lives here and nowhere in the step: reading data, moving batches to
the device, reporting (:class:`fastllm.train.reporting.RunLog`: the start-up block, ``metrics.jsonl``,
the console, TensorBoard, W&B, the profiler), validation, checkpoints and resume.
A checkpoint holds the full :class:`TrainState` (params, optimizer state, step, key), the data
loaders' positions and the config, so a resumed run continues bit for bit (on CPU, in fp32) where
an uninterrupted one would have been.

The loop's lifecycle (docs/reliability.md): it resumes from the newest checkpoint that verifies
(:mod:`fastllm.train.resume`); after each step the ranks agree whether a stop signal or the
checkpoint clock asks for a save (:mod:`fastllm.train.control`); steps with a non-finite loss or
gradient are skipped by the step and counted here; checkpoints are written blocking or in the
background (:mod:`fastllm.train.saver`); the loader's and the writer's threads end on every exit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Optional

import torch

from fastllm import nn, optim, random, tree
from fastllm.config import ConfigError, to_dict
from fastllm.sharding import Mesh, Partitioner, is_spec
from fastllm.sharding import checkpoint as sharded_checkpoint
from fastllm.train import checkpointing, resume
from fastllm.train.config import Config
from fastllm.train.control import BadSteps, StepControl, control_group
from fastllm.train.data import build_loaders, tokenizer_path
from fastllm.train.metrics import Throughput, mfu
from fastllm.train.optimizer import build_optimizer
from fastllm.train.lifecycle import Stopped, signal_stop
from fastllm.train.reporting import RunLog
from fastllm.train.saver import CheckpointWriter
from fastllm.train.signals import StopSignals
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
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if m.data * m.tensor * m.pipe != world:
        raise ConfigError(f"mesh.data={m.data} x mesh.tensor={m.tensor} x mesh.pipe={m.pipe} = "
                         f"{m.data * m.tensor * m.pipe} ranks, but the world has {world} (launch with "
                         f"torchrun --nproc-per-node {m.data * m.tensor * m.pipe})")
    return Mesh.from_env(data=m.data, tensor=m.tensor, pipe=m.pipe, device=resolve_device(config.run.device),
                         timeout_s=config.run.timeout_s)


def partitioner_from_config(config: Config, mesh: Mesh) -> Partitioner:
    return Partitioner(mesh, rules=config.mesh.rules_table(), zero_stage=config.zero.stage,
                       transport=config.zero.transport, virtual_stages=config.pipe.virtual_stages,
                       split=config.pipe.split)


@dataclass
class TrainResult:
    state: TrainState
    history: list[dict[str, Any]] = field(default_factory=list)  # every record this run logged
    earlier: list[dict[str, Any]] = field(default_factory=list)  # the log's records up to where it resumed
    stopped: Optional[Stopped] = None  # why it ended before train.steps (a signal, non-finite steps)

    @property
    def final_loss(self) -> float:
        losses = [r["loss"] for r in self.earlier + self.history if "loss" in r]
        return losses[-1] if losses else math.nan

    @property
    def val_loss(self) -> Optional[float]:
        losses = [r["val_loss"] for r in self.earlier + self.history if "val_loss" in r]
        return losses[-1] if losses else None


class Trainer:
    """``Trainer(config).run()``. ``model``: an :class:`fastllm.nn.Model` (default: the built-in
    decoder of ``config.model``); ``train_data``/``val_data`` override the loaders the config's
    ``data`` section would build (each: an iterator of batch dicts with ``state_dict()`` and
    ``load_state_dict()``); ``mesh``: a :class:`fastllm.sharding.Mesh` (default: ``config.mesh``
    over torchrun's processes, or one process). One path for every layout: a single process is a
    mesh of one. ``signals``: the :class:`StopSignals` of the process's session (default: ``run``
    installs its own for the loop)."""

    def __init__(self, config: Config, *, model: Optional[nn.Model] = None, train_data=None, val_data=None,
                 mesh: Optional[Mesh] = None, signals: Optional[StopSignals] = None):
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
                                    remat=t.remat == "block", compile=t.compile, schedule=config.pipe.schedule)
        self.eval_step = EvalStep(self.model, self.partitioner, precision=t.precision)
        self.is_main = self.mesh.global_rank == 0
        if train_data is None:
            train_data, built_val = build_loaders(config, micro_batch_size=self.micro_batch_size,
                                                  dp_rank=self.mesh.rank("data"), dp_size=data_ranks)
            val_data = built_val if val_data is None else val_data
        self.train_data, self.val_data = train_data, val_data
        # Validation always reads the same batches, from the validation loader's starting position.
        self._val_start = None if val_data is None else val_data.state_dict()
        self.signals = signals
        self._log: Optional[RunLog] = None  # the running loop's
        self._group = control_group(self.mesh.world_size)  # CPU flags and the resume choice (collective)
        self._writer = CheckpointWriter(self._write, asynchronous=t.async_checkpoint,
                                        group=control_group(self.mesh.world_size) if t.async_checkpoint else None)

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
        """The state of the newest checkpoint that verifies (loaders repositioned), or ``None`` when
        there is none; newer damaged ones are said and set aside (:mod:`fastllm.train.resume`)."""
        choice = resume.agreed_choice(self.run_dir, self.mesh.global_rank, self._group)
        for (name, why), aside in zip(choice.skipped, choice.set_aside):
            self._say(f"skipped checkpoint {name}: {why} (kept as {aside})")
        found = choice.path
        if found is None:
            return None
        template = self.init_state()
        state, extra = checkpointing.load(found, template, device=self.device, checksum=False,  # verified
                                          **self._mesh_args(template))
        if extra.get("config") != to_dict(self.config):
            self._say(f"note: resuming from {found}, written with a different config (run.resume=false starts afresh)")
        self._say(f"resuming from {found} at step {state.step}")
        self.train_data.load_state_dict(extra["data"]["train"])
        return state

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run.dir)

    def save(self, state: TrainState) -> None:
        """Checkpoint ``state`` (in the background with ``train.async_checkpoint``)."""
        extra = {
            "config": to_dict(self.config),
            "data": {"train": self.train_data.state_dict()},
        }
        self._writer.save(state, extra)

    def _write(self, state: TrainState, extra: dict, group) -> Path:
        path = checkpointing.save(self.run_dir, state, extra, group=group, **self._mesh_args(state))
        if self.is_main:  # one pruner: the others' next save cannot start before this returns
            checkpointing.prune(self.run_dir, keep=self.config.train.keep_checkpoints)
        return path

    def _mesh_args(self, state: TrainState) -> dict:
        """The spec trees and mesh of the (sharded) checkpoint: every rank writes its shards, and a
        checkpoint loads onto any mesh, one process included."""
        plan, stage = self.train_step.plan, self.mesh.rank("pipe")

        def held(specs: Any) -> Any:  # a pipeline stage holds its own parts' leaves only
            return tree.map_with_path(lambda path, spec: spec if plan.holds(path, stage) else None, specs,
                                      is_leaf=is_spec)

        params = held(plan.params)
        specs = {"params": params, "opt_state": sharded_checkpoint.state_specs(state.opt_state, held(plan.opt_state))}
        if state.loss_scale is not None:
            specs["loss_scale"] = sharded_checkpoint.state_specs(state.loss_scale, params)
        return {"specs": specs, "mesh": self.mesh}

    def _say(self, text: str) -> None:
        if self.is_main:  # through the run's console while it runs (a live line stays below)
            (print if self._log is None else self._log.console.say)(text)

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
        _write_atomically(self.run_dir / "config.json", (json.dumps(to_dict(self.config), indent=2) + "\n").encode())
        tokenizer = tokenizer_path(self.config) if self.config.data.datasets else None
        if tokenizer is not None:  # generate/export find it here
            _write_atomically(self.run_dir / "tokenizer.json", tokenizer.read_bytes())

    def run(self, *, stop_at: Optional[int] = None) -> TrainResult:
        """Train to ``train.steps`` (or stop, with a checkpoint, after step ``stop_at``). A stop
        signal or ``train.max_bad_steps`` non-finite steps in a row end it early: ``result.stopped``."""
        cfg = self.config
        state = self.restore() if cfg.run.resume else None  # a checkpoint that does not fit: refused before run.dir changes
        resumed = state is not None
        state = state if resumed else self.fresh_state()
        self._prepare_run_dir()
        log = self._log = RunLog(self, state.step, resumed)
        last = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
        result = TrainResult(state, earlier=log.metrics.kept)
        flops = self.model.flops_per_token(cfg.data.seq_len) if self.model.flops_per_token else None
        meter = Throughput(self.device)
        saved_at = state.step if resumed else None
        bad = BadSteps(self.device)
        with contextlib.ExitStack() as stack:
            signals = self.signals or stack.enter_context(StopSignals())
            control = stack.enter_context(_closing(StepControl(self._group, signals, cfg.train.checkpoint_minutes * 60),
                                                   self._writer, self.train_data, self.val_data, log))
            decision = None
            while state.step < last:
                log.before_step(state.step + 1)
                batch = self._batch(self.train_data)
                state, metrics = self.train_step(state, batch)
                log.after_step(state.step)
                bad.add(metrics.pop("nonfinite"), state.step)
                meter.add(batch["tokens"].numel())
                step = state.step
                if step % cfg.train.log_every == 0 or step == last:
                    record = self._record(step, metrics, meter.measure(), flops)
                    result.stopped = self._count_bad(bad, record)
                    result.history.append(log.write(record))
                if result.stopped is not None:
                    break
                if self.val_data is not None and _due(step, cfg.train.eval_every, last):
                    result.history.append(log.write({"step": step, "val_loss": self.evaluate(state.params)}))
                decision = control.after_step()
                periodic = _due(step, cfg.train.checkpoint_every, last) and (step != last or cfg.train.final_checkpoint)
                if periodic or decision.checkpoint or decision.stop:
                    self.save(state)
                    control.saved()
                    saved_at = step
                if decision.stop:
                    break
            if result.stopped is None and saved_at != state.step and cfg.train.final_checkpoint:
                self.save(state)
            path = self._writer.wait()
            if decision is not None and decision.stop:
                result.stopped = signal_stop(decision.stop, state.step, path)
        result.state = state
        return result

    def _count_bad(self, bad: BadSteps, record: dict) -> Optional[Stopped]:
        """Put the non-finite steps since the last record into ``record`` (and say them); the end of
        the run when ``train.max_bad_steps`` came in a row. Read at the log points: no extra sync."""
        total, run, longest, last = bad.read()
        skipped, bad.reported = total - bad.reported, total
        if skipped:
            record["skipped"] = skipped
            self._say(f"step {record['step']}: {skipped} update(s) skipped for a non-finite loss or gradient "
                      f"(the last at step {last}; {total} in all)")
        limit = self.config.train.max_bad_steps
        if longest < limit:
            return None
        since = f"no update after step {record['step'] - run} was applied" if run else f"the last at step {last}"
        newest = checkpointing.latest(self.run_dir)
        kept = "no checkpoint was written" if newest is None else f"the newest checkpoint is {newest}"
        return Stopped(f"error: stopped at step {record['step']}: {longest} steps in a row had a non-finite loss or "
                       f"gradient (train.max_bad_steps={limit}); {since}; {kept}", 1)

    def _record(self, step: int, metrics: dict, tokens_per_s: float, flops: Optional[float]) -> dict:
        record = {"step": step, **{name: value.item() for name, value in metrics.items()}}
        record["tokens_per_s"] = tokens_per_s
        if self.device.type == "cuda" and flops is not None:
            # tokens_per_s counts this data rank's tokens, which its tensor (and pipe) ranks share
            record["mfu"] = mfu(tokens_per_s / (self.mesh.size("tensor") * self.mesh.size("pipe")), flops)
        return record


class _closing(contextlib.AbstractContextManager):
    """Ends the loop's helpers on every way out: the step control's pending reduction and the
    checkpoint writer (waited for; their errors raised only when the loop ended cleanly), the
    loaders' prefetch threads and the progress bar."""

    def __init__(self, control: StepControl, writer: CheckpointWriter, *others):
        self.control, self.writer, self.others = control, writer, others

    def __enter__(self) -> StepControl:
        return self.control

    def __exit__(self, kind, error, traceback) -> None:
        clean = error is None
        try:
            self.control.close(clean=clean)
            self.writer.close(clean=clean)
        finally:
            for other in self.others:
                close = getattr(other, "close", None)
                if close is not None:
                    close()


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: a reader (or the next run,
    after a kill) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _due(step: int, every: int, last: int) -> bool:
    """Periodic events fire every ``every`` steps and always at the last step."""
    return step == last or (every > 0 and step % every == 0)


