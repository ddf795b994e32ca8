"""Rotary position embeddings (RoFormer, Su et al. 2021) in the "rotate_half" layout.

The first ``rot_dim = fraction * head_dim`` dims of each query/key head rotate: pair ``i`` is
(dim ``i``, dim ``i + rot_dim/2``) and turns by angle ``position * inv_freq[i]`` with
``inv_freq[i] = theta^(-2i/rot_dim)``. This is transformers' Llama layout, so Hugging Face
checkpoints need no permutation. Angles come from explicit ``positions``, so positions that reset
at document boundaries (packed sequences) just work.

Scalings of ``inv_freq``:
* ``linear`` (position interpolation, Chen et al. 2023): ``inv_freq / factor``;
* ``llama3`` (Llama 3.1): wavelengths longer than ``original_max_positions / low_freq_factor``
  are divided by ``factor``, shorter than ``original_max_positions / high_freq_factor`` kept, and
  the band between interpolated smoothly.

The rotation itself (``apply``, ``rotate_half``) is defined once, in :mod:`fastllm.kernels.rotary`,
beside its fused kernel; this module computes the angles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from fastllm.kernels.rotary import rotate_half
from fastllm.kernels.rotary import rotate_reference as apply

__all__ = ["Rotary", "inverse_frequencies", "cos_sin", "positions_of", "apply", "rotate_half"]


@dataclass(frozen=True)
class Rotary:
    head_dim: int
    theta: float = 10000.0
    scaling: Literal["none", "linear", "llama3"] = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192
    fraction: float = 1.0

    @property
    def rot_dim(self) -> int:
        rot = int(self.head_dim * self.fraction)
        if rot % 2 or rot <= 0:
            raise ValueError(f"rotary dims = head_dim*fraction = {rot} must be even and > 0")
        return rot


def _llama3(inv_freq: Tensor, rot: Rotary) -> Tensor:
    low_wavelen = rot.original_max_positions / rot.low_freq_factor
    high_wavelen = rot.original_max_positions / rot.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rot.factor, inv_freq)
    smooth = (rot.original_max_positions / wavelen - rot.low_freq_factor) / (
        rot.high_freq_factor - rot.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rot.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def inverse_frequencies(rot: Rotary, device=None) -> Float[Tensor, "half"]:
    """``[rot_dim / 2]`` float32 angular frequencies, scaled as ``rot.scaling`` says."""
    exponents = torch.arange(0, rot.rot_dim, 2, dtype=torch.int64, device=device).float() / rot.rot_dim
    inv_freq = 1.0 / (rot.theta**exponents)
    if rot.scaling == "linear":
        return inv_freq / rot.factor
    if rot.scaling == "llama3":
        return _llama3(inv_freq, rot)
    if rot.scaling != "none":
        raise ValueError(f"rotary scaling must be 'none', 'linear' or 'llama3', got {rot.scaling!r}")
    return inv_freq


def positions_of(tokens: Int[Tensor, "batch seq"], start: int = 0) -> Int[Tensor, "batch seq"]:
    """Each token's position when every row is one sequence starting at ``start``."""
    return torch.arange(start, start + tokens.shape[1], device=tokens.device).expand(tokens.shape)


def cos_sin(
    rot: Rotary, positions: Int[Tensor, "batch seq"], dtype: torch.dtype = torch.float32
) -> tuple[Float[Tensor, "batch seq rot"], Float[Tensor, "batch seq rot"]]:
    """cos and sin of every angle, computed in float32 then cast (as transformers does)."""
    inv_freq = inverse_frequencies(rot, device=positions.device)
    angles = positions[..., None].float() * inv_freq  # [batch, seq, rot/2]
    angles = torch.cat((angles, angles), dim=-1)  # [batch, seq, rot]
    return angles.cos().to(dtype), angles.sin().to(dtype)
