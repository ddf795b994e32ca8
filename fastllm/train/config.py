"""The training config: one frozen dataclass tree that a recipe builds and the Trainer runs.

Sections: ``run`` (where and how), ``model`` (a preset plus field overrides), ``data``
(:class:`fastllm.data.DataConfig`: prepared datasets, blend, packing, validation split), ``train``
(steps, batch, precision, recomputation, logging/eval/checkpoint cadence), ``optim`` (AdamW and its
schedule), ``mesh``/``pipe``/``zero`` (parallel layout), ``sample`` (generation after training and the
defaults of ``fastllm generate``) and ``log`` (TensorBoard, Weights & Biases, profiling).
docs/config.md lists every key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from fastllm.config import ConfigError, merge_partial, partial_fields, require
from fastllm.data.config import DataConfig
from fastllm.models.config import ModelConfig

__all__ = [
    "Config",
    "RunConfig",
    "ModelSection",
    "TrainSection",
    "OptimSection",
    "MeshSection",
    "PipeSection",
    "ZeroSection",
    "SampleSection",
    "LogSection",
    "resolve_model",
]


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"  # metrics.jsonl, checkpoints/, config.json and exports go here
    seed: int = 0
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1"
    resume: bool = True  # continue from the newest checkpoint in dir/checkpoints when there is one
    progress: Literal["auto", "on", "off"] = "auto"  # live display: "auto" on a terminal, "off": a line every log_every steps
    export_hf: bool = False  # after training, write a Hugging Face checkpoint to dir/hf
    timeout_s: float = 600.0  # how long a rank waits in a collective for a peer before it names it dead or hung
    init_from: Optional[str] = None  # start from these weights (any model directory fastllm reads), not from init

    def __post_init__(self):
        require(bool(self.dir), "run.dir", "must not be empty")
        require(self.timeout_s > 0, "run.timeout_s", f"must be > 0, got {self.timeout_s}")
        require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), "run.device",
                f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")


def _model_section_post_init(self):
    from fastllm import models  # models are heavy; import at validation time only

    presets = getattr(models, "PRESETS", {})
    require(self.preset in presets, "model.preset",
            f"unknown preset {self.preset!r}; known presets: {', '.join(sorted(presets))}")
    try:
        resolve_model(self)
    except ValueError as error:
        raise ValueError(f"model.{error}") from None


# ``model.preset`` names a preset; every other field of ModelConfig may be set on top of it and is
# ``None`` ("keep the preset's value") by default.
ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    [("preset", str, field(default="tiny-llama"))] + partial_fields(ModelConfig),
    frozen=True,
    namespace={"__post_init__": _model_section_post_init, "__module__": __name__},
)


def resolve_model(section) -> ModelConfig:
    """The ModelConfig a model section describes: the preset with the section's overrides on top."""
    from fastllm import models

    base = models.preset(section.preset)
    names = [f.name for f in dataclasses.fields(section) if f.name != "preset"]
    return merge_partial(base, section, names)


@dataclass(frozen=True)
class TrainSection:
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # sequences per optimizer step, all data ranks together: the recipe fixes it
    micro_batch_size: Optional[int] = None  # sequences per forward/backward on one rank; None: batch_size / mesh.data
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # compute dtype; master weights stay fp32
    remat: Literal["none", "block"] = "none"  # "block": recompute each block's activations in backward
    compile: bool = False  # torch.compile each decoder block (fastllm.train.compile); needs FASTLLM_TYPECHECK=0
    grad_clip: Optional[float] = 1.0  # clip the global gradient norm; None: no clipping
    loss_scale: float = 2.0**15  # fp16 only: initial dynamic loss scale
    loss_scale_growth_interval: int = 2000  # fp16 only: good steps before the scale doubles
    log_every: int = 10  # steps between lines of metrics.jsonl
    eval_every: int = 0  # steps between validation losses; 0: only at the end (when data.val is set)
    eval_batches: int = 8  # micro-batches per validation loss
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at the end (and by checkpoint_minutes)
    checkpoint_minutes: float = 10.0  # also checkpoint when this much time passed since the last one; 0: off
    async_checkpoint: bool = False  # write checkpoints in a background thread from a host copy of the state
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    final_checkpoint: bool = True  # checkpoint when the run ends; false: only the ones above (benchmarks)
    max_bad_steps: int = 10  # stop after this many steps in a row with a non-finite loss or gradient (each is skipped)

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "eval_batches", "keep_checkpoints",
                     "loss_scale_growth_interval", "max_bad_steps"):
            value = getattr(self, name)
            require(value > 0, f"train.{name}", f"must be > 0, got {value}")
        require(self.micro_batch_size is None or self.micro_batch_size > 0, "train.micro_batch_size",
                f"must be > 0 or none, got {self.micro_batch_size}")
        require(self.micro_batch_size is None or self.batch_size % self.micro_batch_size == 0, "train.batch_size",
                f"{self.batch_size} is not a multiple of train.micro_batch_size={self.micro_batch_size}")
        for name in ("eval_every", "checkpoint_every"):
            value = getattr(self, name)
            require(value >= 0, f"train.{name}", f"must be >= 0, got {value}")
        require(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip",
                f"must be > 0 or None, got {self.grad_clip}")
        require(self.loss_scale > 0, "train.loss_scale", f"must be > 0, got {self.loss_scale}")
        require(self.checkpoint_minutes >= 0, "train.checkpoint_minutes", f"must be >= 0, got {self.checkpoint_minutes}")

    def micro_batch(self, data_ranks: int) -> int:
        """Sequences per forward/backward on one rank when ``data_ranks`` share the batch."""
        if self.micro_batch_size is not None:
            return self.micro_batch_size
        _refuse_unless(self.batch_size % data_ranks == 0, "train.batch_size",
                       f"{self.batch_size} sequences do not split over mesh.data={data_ranks} ranks")
        return self.batch_size // data_ranks

    def grad_accum(self, data_ranks: int) -> int:
        """Micro-batches per optimizer step on each rank: ``batch_size / (micro_batch_size x data)``."""
        per_pass = self.micro_batch(data_ranks) * data_ranks
        _refuse_unless(self.batch_size % per_pass == 0, "train.batch_size",
                       f"{self.batch_size} is not a multiple of train.micro_batch_size={self.micro_batch(data_ranks)} "
                       f"x mesh.data={data_ranks} = {per_pass} (sequences per forward/backward over all data ranks)")
        return self.batch_size // per_pass


def _refuse_unless(condition: bool, key: str, message: str) -> None:
    """A check of the config against the world it runs in (after construction, so outside a
    recipe): bad input, a ConfigError, one line from the command."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class OptimSection:
    """AdamW (Loshchilov & Hutter 2019) with linear warmup then a decay schedule."""

    lr: float = 3e-4  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only (not norms, biases)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr (cosine, linear)

    def __post_init__(self):
        require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        require(all(0 <= b < 1 for b in self.betas), "optim.betas", f"must be in [0, 1), got {self.betas}")
        require(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")


def _default_rules() -> dict[str, Any]:
    from fastllm.sharding.rules import COMPUTE_RULES

    return COMPUTE_RULES.as_mapping()


@dataclass(frozen=True)
class MeshSection:
    """Process grid: data x tensor x pipe ranks (their product is the world size), and the rules
    that lay parameters and activations out on it: ``{logical dim: mesh axis | [axes] | None}`` in
    priority order (``mesh.rules.seq=tensor``: sequence parallelism; docs/sharding.md)."""

    data: int = 1
    tensor: int = 1
    pipe: int = 1
    rules: dict[str, Any] = field(default_factory=_default_rules)

    def __post_init__(self):
        for name in ("data", "tensor", "pipe"):
            require(getattr(self, name) >= 1, f"mesh.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(isinstance(self.rules, dict) and bool(self.rules), "mesh.rules",
                f"must be a non-empty mapping of logical dims to mesh axes, got {self.rules!r}")
        try:
            self.rules_table()
        except ValueError as error:
            raise ValueError(f"mesh.rules: {error}") from None

    def rules_table(self):
        """The rules as a :class:`fastllm.sharding.Rules` table."""
        from fastllm.sharding.rules import Rules

        return Rules.from_mapping(self.rules)

    @property
    def size(self) -> int:
        return self.data * self.tensor * self.pipe


@dataclass(frozen=True)
class PipeSection:
    """Pipeline parallelism over ``mesh.pipe`` ranks (docs/sharding.md, "Pipelines")."""

    schedule: Literal["gpipe", "1f1b", "interleaved"] = "1f1b"
    virtual_stages: int = 1  # chunks per pipeline rank (the interleaved schedule needs > 1)
    split: Optional[tuple[int, ...]] = None  # layers per chunk (default: balanced by parameters)

    def __post_init__(self):
        require(self.virtual_stages >= 1, "pipe.virtual_stages", f"must be >= 1, got {self.virtual_stages}")
        require((self.virtual_stages > 1) == (self.schedule == "interleaved"), "pipe.virtual_stages",
                f"{self.virtual_stages} with pipe.schedule={self.schedule!r}: the interleaved schedule needs "
                "virtual_stages > 1, and only it takes them")
        require(self.split is None or (len(self.split) > 0 and min(self.split) >= 1), "pipe.split",
                f"must list at least one layer per chunk, got {self.split}")


@dataclass(frozen=True)
class ZeroSection:
    stage: Literal[0, 1, 2, 3] = 0  # shard optimizer state (1), + gradients (2), + parameters (3) over data
    # how ZeRO-3 moves parameters and gradients: NVLink copy engines (one host, CUDA), NCCL, or the first that runs
    transport: Literal["auto", "nccl", "copy_engine"] = "auto"


@dataclass(frozen=True)
class SampleSection:
    prompt: str = ""  # after training, print a sample continuing this prompt (needs the tokenizer)
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    def __post_init__(self):
        require(self.max_new_tokens >= 0, "sample.max_new_tokens", f"must be >= 0, got {self.max_new_tokens}")
        require(self.temperature >= 0, "sample.temperature", f"must be >= 0, got {self.temperature}")
        require(self.top_k is None or self.top_k > 0, "sample.top_k", f"must be > 0, got {self.top_k}")
        require(self.top_p is None or 0 < self.top_p <= 1, "sample.top_p", f"must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class LogSection:
    """Where metrics go besides ``<run.dir>/metrics.jsonl`` (always written), and profiling."""

    tensorboard: bool = False  # TensorBoard scalars in <run.dir>/tensorboard (needs the tensorboard package)
    wandb_project: Optional[str] = None  # log to Weights & Biases under this project (needs wandb)
    wandb_mode: Literal["online", "offline"] = "online"  # offline: write <run.dir>/wandb, sync later
    wandb_name: Optional[str] = None  # the W&B run's name (default: run.dir's last part)
    profile_steps: Optional[tuple[int, int]] = None  # torch profiler trace of steps [first, last] to <run.dir>/profile

    def __post_init__(self):
        require(self.wandb_project is None or bool(self.wandb_project.strip()), "log.wandb_project",
                "must not be empty (none: no W&B)")
        p = self.profile_steps
        require(p is None or 1 <= p[0] <= p[1], "log.profile_steps",
                f"must be two steps first,last with 1 <= first <= last, got {p}")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    pipe: PipeSection = field(default_factory=PipeSection)
    zero: ZeroSection = field(default_factory=ZeroSection)
    sample: SampleSection = field(default_factory=SampleSection)
    log: LogSection = field(default_factory=LogSection)

    def __post_init__(self):
        if isinstance(self.model, ModelSection):  # a recipe's own model config checks itself
            model = resolve_model(self.model)
            require(self.data.seq_len <= model.max_seq_len, "data.seq_len",
                    f"{self.data.seq_len} exceeds the model's max_seq_len={model.max_seq_len}")
        require(self.optim.warmup_steps <= self.train.steps, "optim.warmup_steps",
                f"{self.optim.warmup_steps} exceeds train.steps={self.train.steps}")

    @property
    def model_config(self) -> Any:
        """The built-in decoder's :class:`ModelConfig`, or a recipe's own model config as it is."""
        return resolve_model(self.model) if isinstance(self.model, ModelSection) else self.model
