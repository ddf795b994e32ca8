"""Where rank 0's metrics go besides ``metrics.jsonl``: TensorBoard and Weights & Biases, each
when the config's ``log`` section asks for it; and the torch profiler over a range of steps.

Each sink takes the records ``metrics.jsonl`` gets (numbers keyed by name, with ``step``) and logs
every number as a scalar at that step. The libraries are imported only when asked for, and a
missing one is a one-line error naming the extra to install.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Optional

from fastllm.errors import UserError

__all__ = ["TensorBoardSink", "WandbSink", "Profiler", "build_sinks", "scalars"]


def _require(module: str, extra: str, key: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{key} needs the {module.split('.')[0]} package: pip install 'fastllm[{extra}]'") from None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a record, ``step`` left out."""
    return {name: float(value) for name, value in record.items()
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoardSink:
    """Scalars in ``<run.dir>/tensorboard`` (``tensorboard --logdir <run.dir>``)."""

    def __init__(self, run_dir: Path):
        _require("tensorboard", "logging", "log.tensorboard=true")
        from torch.utils.tensorboard import SummaryWriter

        self.directory = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.directory))

    def write(self, record: dict[str, Any]) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run (``offline``: files in ``<run.dir>/wandb``; ``wandb sync`` uploads them)."""

    def __init__(self, run_dir: Path, config: Any, *, resumed: bool):
        from fastllm.config import to_dict

        wandb = _require("wandb", "logging", "log.wandb_project")
        log = config.log
        self.run = wandb.init(project=log.wandb_project, name=log.wandb_name or run_dir.resolve().name,
                              dir=str(run_dir), mode=log.wandb_mode, config=to_dict(config),
                              resume="allow" if resumed else None, id=_wandb_id(run_dir))
        self.directory = Path(self.run.dir).parent

    def write(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def _wandb_id(run_dir: Path) -> str:
    """One W&B id per run directory, kept in it: a resumed run continues the same W&B run."""
    import uuid

    path = run_dir / "wandb_id"
    if not path.is_file():
        path.write_text(uuid.uuid4().hex[:16])
    return path.read_text().strip()


class Profiler:
    """A torch profiler trace of steps ``first..last`` (1-based, inclusive) written to
    ``<run.dir>/profile`` as a Chrome trace (open in Perfetto or chrome://tracing)."""

    def __init__(self, run_dir: Path, first: int, last: int):
        self.first, self.last, self.directory = first, last, run_dir / "profile"
        self.profile = None

    def before(self, step: int) -> None:
        """Called before step ``step`` (1-based) runs."""
        if step == self.first and self.profile is None:
            import torch

            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
            self.profile.__enter__()

    def after(self, step: int) -> Optional[Path]:
        """Called after step ``step``; returns the trace's path when it was written."""
        if self.profile is None or step < self.last:
            return None
        self.profile.__exit__(None, None, None)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"steps-{self.first}-{self.last}.json"
        self.profile.export_chrome_trace(str(path))
        self.profile = None
        return path


def build_sinks(config: Any, run_dir: Path, *, resumed: bool) -> list:
    """The sinks ``config.log`` asks for (none by default)."""
    sinks: list = []
    if config.log.tensorboard:
        sinks.append(TensorBoardSink(run_dir))
    if config.log.wandb_project:
        sinks.append(WandbSink(run_dir, config, resumed=resumed))
    return sinks
