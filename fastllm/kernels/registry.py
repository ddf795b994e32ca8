"""Which implementation runs each op: a frozen config, resolved per call, no global switch.

Every op has a Triton kernel and a pure-torch reference. ``"auto"`` picks Triton when the tensors
live on CUDA and Triton imports, the reference otherwise; ``"triton"`` forces the kernel (on CPU it
runs in Triton's interpreter, so ``TRITON_INTERPRET=1`` must be set); ``"torch"`` forces the
reference, which is how one debugs a suspected kernel: flip one field of the config.

``matmul`` is the one field that changes the arithmetic rather than who does it: ``"fp8"`` runs the
blocks' projections (q, k, v, o; up, gate, down) through :func:`fastllm.kernels.fp8.fp8_linear`
instead of matmuls in the compute dtype; the LM head, the router and the experts stay as they are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from fastllm.kernels import _triton

__all__ = ["Choice", "KernelConfig", "Matmul", "OPS", "select", "resolve"]

Choice = Literal["auto", "triton", "torch"]
CHOICES = ("auto", "triton", "torch")
Matmul = Literal["compute", "fp8"]
MATMULS = ("compute", "fp8")


@dataclass(frozen=True)
class KernelConfig:
    """One field per op. ``KernelConfig.all("torch")`` turns every kernel off."""

    rms_norm: Choice = "auto"
    layer_norm: Choice = "auto"
    rotary: Choice = "auto"
    activation: Choice = "auto"  # gelu, swiglu, geglu, ...
    cross_entropy: Choice = "auto"  # fused LM head + cross-entropy
    moe: Choice = "auto"  # dispatch / grouped matmul / combine
    adamw: Choice = "auto"
    grad_norm: Choice = "auto"
    attention: Choice = "auto"  # "triton" here means PyTorch's fused kernels (flash SDPA, FlexAttention)
    matmul: Matmul = "compute"  # the blocks' projections: in the compute dtype, or "fp8"

    def __post_init__(self):
        for name in OPS:
            value = getattr(self, name)
            if value not in CHOICES:
                raise ValueError(f"kernels.{name}: must be one of {CHOICES}, got {value!r}")
        if self.matmul not in MATMULS:
            raise ValueError(f"kernels.matmul: must be one of {MATMULS}, got {self.matmul!r}")

    @classmethod
    def all(cls, choice: Choice) -> "KernelConfig":
        """Every op's implementation set to ``choice`` (``matmul``, not an implementation, as is)."""
        return cls(**{name: choice for name in OPS})

    def replace(self, **changes) -> "KernelConfig":
        return dataclasses.replace(self, **changes)


OPS = tuple(spec.name for spec in dataclasses.fields(KernelConfig) if spec.name != "matmul")


def resolve(choice: Choice, device: torch.device | str) -> Literal["triton", "torch"]:
    """The implementation that ``choice`` means for tensors on ``device``."""
    if choice not in CHOICES:
        raise ValueError(f"kernel choice must be one of {CHOICES}, got {choice!r}")
    if choice != "auto":
        if choice == "triton" and not _triton.available():
            raise RuntimeError("kernel choice 'triton' but the triton package does not import")
        return choice
    device = torch.device(device)
    return "triton" if device.type == "cuda" and _triton.available() else "torch"


def select(config: KernelConfig | None, op: str, device: torch.device | str) -> Literal["triton", "torch"]:
    """``resolve`` the config's choice for ``op``; ``config=None`` means all ``"auto"``."""
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; known: {OPS}")
    choice = "auto" if config is None else getattr(config, op)
    return resolve(choice, device)
