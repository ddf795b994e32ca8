"""The decoder family's configuration: one frozen dataclass covers GPT-2, StarCoder, Llama,
Mistral, Mixtral and Qwen2. Validation happens once, at construction, naming the bad field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from fastllm.kernels.registry import KernelConfig

__all__ = ["RopeConfig", "MoEConfig", "ModelConfig", "FAMILIES"]

FAMILIES = ("gpt2", "starcoder", "llama", "mistral", "mixtral", "qwen2", "custom")


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field_name}: {message}")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embeddings (Su et al. 2021), with the scalings Llama 3 and others use."""

    theta: float = 10000.0
    scaling: Literal["none", "linear", "llama3"] = "none"
    factor: float = 1.0  # linear and llama3 scaling
    low_freq_factor: float = 1.0  # llama3 scaling
    high_freq_factor: float = 4.0  # llama3 scaling
    original_max_positions: int = 8192  # llama3 scaling
    fraction: float = 1.0  # partial rotary: share of head_dim that rotates

    def __post_init__(self):
        _require(self.theta > 0, "rope.theta", f"must be > 0, got {self.theta}")
        _require(self.scaling in ("none", "linear", "llama3"), "rope.scaling",
                 f"must be 'none', 'linear' or 'llama3', got {self.scaling!r}")
        _require(self.factor > 0, "rope.factor", f"must be > 0, got {self.factor}")
        _require(0 < self.fraction <= 1, "rope.fraction", f"must be in (0, 1], got {self.fraction}")


@dataclass(frozen=True)
class MoEConfig:
    """Mixture of experts replacing the MLP (Shazeer et al. 2017; Mixtral, Jiang et al. 2024)."""

    n_experts: int = 8
    top_k: int = 2
    normalize_top_k: bool = True  # renormalise the k routing weights to sum to one (Mixtral)
    aux_loss_coef: float = 0.01  # load-balancing loss (Switch Transformer, Fedus et al. 2021)
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE, Zoph et al. 2022)
    # None: dropless (Mixtral); else each expert takes at most capacity_factor * seq * top_k /
    # n_experts picks of a sequence and the rest are dropped (GShard, Lepikhin et al. 2020)
    capacity_factor: Optional[float] = None

    def __post_init__(self):
        _require(self.n_experts >= 1, "moe.n_experts", f"must be >= 1, got {self.n_experts}")
        _require(1 <= self.top_k <= self.n_experts, "moe.top_k",
                 f"must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        _require(self.aux_loss_coef >= 0, "moe.aux_loss_coef", "must be >= 0")
        _require(self.z_loss_coef >= 0, "moe.z_loss_coef", "must be >= 0")
        _require(self.capacity_factor is None or self.capacity_factor > 0, "moe.capacity_factor",
                 f"must be > 0 or None, got {self.capacity_factor}")


@dataclass(frozen=True)
class ModelConfig:
    """A pre-norm decoder-only transformer. ``head_dim`` defaults to ``embed_dim // n_heads``."""

    vocab_size: int = 32000
    embed_dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: multi-head; 1: multi-query; else grouped-query
    head_dim: Optional[int] = None
    mlp_dim: int = 11008
    activation: Literal["silu", "gelu", "gelu_tanh", "relu"] = "silu"
    gated_mlp: bool = True  # SwiGLU / GeGLU
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    positions: Literal["rotary", "learned"] = "rotary"
    max_seq_len: int = 4096
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: Optional[int] = None  # tokens a query may look back, itself included
    # None: the window applies to every layer; n: only to layers i >= n (Qwen2's max_window_layers)
    sliding_window_layers: Optional[int] = None
    moe: Optional[MoEConfig] = None
    init_std: float = 0.02
    family: str = "llama"  # which Hugging Face architecture save() writes
    # which implementation runs each op ("auto": Triton on CUDA, the torch reference elsewhere) and
    # the projections' precision (matmul="fp8"); not part of the model, so Hugging Face export ignores it
    kernels: KernelConfig = field(default_factory=KernelConfig)

    def __post_init__(self):
        for name in ("vocab_size", "embed_dim", "n_layers", "n_heads", "mlp_dim", "max_seq_len"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, name, f"must be a positive int, got {value!r}")
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            _require(self.embed_dim % self.n_heads == 0, "head_dim",
                     f"not given and embed_dim={self.embed_dim} is not divisible by n_heads={self.n_heads}")
            object.__setattr__(self, "head_dim", self.embed_dim // self.n_heads)
        _require(self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
                 f"must divide n_heads={self.n_heads}, got {self.n_kv_heads}")
        _require(self.activation in ("silu", "gelu", "gelu_tanh", "relu"), "activation",
                 f"unknown activation {self.activation!r}")
        _require(self.norm in ("rmsnorm", "layernorm"), "norm", f"unknown norm {self.norm!r}")
        _require(self.positions in ("rotary", "learned"), "positions", f"unknown {self.positions!r}")
        _require(self.norm_eps > 0, "norm_eps", "must be > 0")
        _require(self.sliding_window is None or self.sliding_window > 0, "sliding_window",
                 f"must be None or > 0, got {self.sliding_window}")
        _require(self.family in FAMILIES, "family", f"must be one of {FAMILIES}, got {self.family!r}")
        if isinstance(self.rope, dict):
            object.__setattr__(self, "rope", RopeConfig(**self.rope))
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig(**self.moe))
        if isinstance(self.kernels, dict):
            object.__setattr__(self, "kernels", KernelConfig(**self.kernels))
        _require(isinstance(self.kernels, KernelConfig), "kernels",
                 f"must be a KernelConfig or a dict of its fields, got {type(self.kernels).__name__}")

    @property
    def kv_groups(self) -> int:
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        """A validated copy with ``changes``. ``head_dim`` and ``n_kv_heads`` that were derived
        (``embed_dim // n_heads``, multi-head) are derived again from the new shapes unless given,
        so ``preset("llama2-7b").replace(embed_dim=64, n_heads=4)`` gets ``head_dim=16``."""
        reshaped = "embed_dim" in changes or "n_heads" in changes
        if reshaped and "head_dim" not in changes and self.head_dim == self.embed_dim // self.n_heads:
            changes["head_dim"] = None
        if "n_heads" in changes and "n_kv_heads" not in changes and self.n_kv_heads == self.n_heads:
            changes["n_kv_heads"] = None
        return dataclasses.replace(self, **changes)
