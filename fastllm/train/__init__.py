"""Training: the config, the pure train/eval steps, the Trainer and its checkpoints.

    from fastllm.config import load_recipe
    from fastllm.train import Trainer

    _, config = load_recipe("recipes/quickstart.py", ["train.steps=50"])
    result = Trainer(config).run()

See docs/config.md for every config key.
"""

from fastllm.train import checkpointing
from fastllm.train.config import (
    Config,
    LogSection,
    MeshSection,
    ModelSection,
    OptimSection,
    RunConfig,
    SampleSection,
    TrainSection,
    ZeroSection,
)
from fastllm.train.optimizer import build_optimizer, learning_rate_schedule
from fastllm.train.run import train
from fastllm.train.state import TrainState
from fastllm.train.step import EvalStep, TrainStep
from fastllm.train.trainer import Trainer, TrainResult

__all__ = [
    "Config",
    "RunConfig",
    "ModelSection",
    "TrainSection",
    "OptimSection",
    "MeshSection",
    "ZeroSection",
    "SampleSection",
    "LogSection",
    "TrainState",
    "TrainStep",
    "EvalStep",
    "build_optimizer",
    "learning_rate_schedule",
    "Trainer",
    "TrainResult",
    "train",
    "checkpointing",
]
