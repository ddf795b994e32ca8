"""Learning-rate schedules: pure functions of the step (the number of updates already applied).

A schedule is a frozen dataclass called as ``schedule(step)``. ``step`` may be a Python int (the
result is a float, for logging) or a 0-d tensor (the result is a 0-d float64 tensor on the same
device, computed with tensor ops only: no host sync, no recompilation under ``torch.compile``).
The first update uses ``schedule(0)``.

Knots (``W`` = ``warmup_steps``, ``T`` = ``total_steps``, ``peak`` the maximum, ``floor`` =
``peak * min_ratio``):

* warmup: ``peak * (step + 1) / W`` for ``step < W``, so step 0 already moves (``peak / W``) and
  step ``W - 1`` reaches ``peak``;
* cosine (Loshchilov & Hutter 2017): ``floor + (peak - floor) * (1 + cos(pi * p)) / 2`` with
  ``p = (step - W) / (T - W)`` clamped to [0, 1]: ``peak`` at ``W``, ``floor`` from ``T`` on;
* linear decay: ``floor + (peak - floor) * (1 - p)``, same ``p``;
* warmup-stable-decay (WSD; Hu et al. 2024, MiniCPM; Hägele et al. 2024): ``peak`` from ``W``
  until ``D = T - decay_steps``, then decays to ``floor`` at ``T`` along ``linear`` (1 - q),
  ``cosine`` or ``sqrt`` (1 - sqrt(q)) with ``q = (step - D) / decay_steps``;
* ``join(schedules, boundaries)``: ``schedules[i]`` on ``[boundaries[i-1], boundaries[i])``, each
  called with the step counted from the start of its own segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal, Union

import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "Constant",
    "WarmupConstant",
    "Cosine",
    "LinearDecay",
    "WSD",
    "Join",
    "constant",
    "warmup_constant",
    "cosine",
    "linear_decay",
    "wsd",
    "join",
]

Step = Union[int, Tensor]
Schedule = Callable[[Step], Union[float, Tensor]]


def _steps(step: Step) -> Tensor:
    if isinstance(step, Tensor):
        return step.to(torch.float64)
    return torch.tensor(float(step), dtype=torch.float64)


def _result(step: Step, value: Tensor) -> Union[float, Tensor]:
    return value if isinstance(step, Tensor) else float(value)


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {message}")


def _warmup(s: Tensor, warmup_steps: int) -> Tensor:
    """Multiplier rising (step + 1) / W over the first W steps, then 1."""
    if warmup_steps == 0:
        return torch.ones_like(s)
    return torch.clamp((s + 1) / warmup_steps, max=1.0)


def _progress(s: Tensor, start: int, length: int) -> Tensor:
    return torch.clamp((s - start) / max(length, 1), 0.0, 1.0)


def _check_peak(peak: float, warmup_steps: int, min_ratio: float = 0.0) -> None:
    _require(peak >= 0, "peak", f"must be >= 0, got {peak}")
    _require(warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {warmup_steps}")
    _require(0 <= min_ratio <= 1, "min_ratio", f"must be in [0, 1], got {min_ratio}")


def _remaining(q: Tensor, shape: str) -> Tensor:
    """The fraction of ``peak - floor`` left after decay progress ``q`` in [0, 1]."""
    if shape == "linear":
        return 1 - q
    if shape == "cosine":
        return 0.5 * (1 + torch.cos(math.pi * q))
    return 1 - torch.sqrt(q)


def _after_warmup(s: Tensor, peak: float, warmup_steps: int, value: Tensor) -> Tensor:
    """The warmup ramp for ``s < W``, ``value`` from there on."""
    return torch.where(s < warmup_steps, peak * _warmup(s, warmup_steps), value)


@dataclass(frozen=True)
class Constant:
    value: float

    def __call__(self, step: Step) -> Union[float, Tensor]:
        return _result(step, torch.full_like(_steps(step), self.value))


@dataclass(frozen=True)
class WarmupConstant:
    peak: float
    warmup_steps: int

    def __post_init__(self):
        _check_peak(self.peak, self.warmup_steps)

    def __call__(self, step: Step) -> Union[float, Tensor]:
        return _result(step, self.peak * _warmup(_steps(step), self.warmup_steps))


@dataclass(frozen=True)
class _WarmupDecay:
    """Warmup to ``peak``, then decay to ``floor`` at ``total_steps`` along the subclass' ``_shape``."""

    peak: float
    total_steps: int
    warmup_steps: int = 0
    min_ratio: float = 0.0
    _shape: ClassVar[str]

    def __post_init__(self):
        _check_peak(self.peak, self.warmup_steps, self.min_ratio)
        _require(self.total_steps >= self.warmup_steps, "total_steps",
                 f"must be >= warmup_steps={self.warmup_steps}, got {self.total_steps}")

    def __call__(self, step: Step) -> Union[float, Tensor]:
        s = _steps(step)
        p = _progress(s, self.warmup_steps, self.total_steps - self.warmup_steps)
        floor = self.peak * self.min_ratio
        decayed = floor + (self.peak - floor) * _remaining(p, self._shape)
        return _result(step, _after_warmup(s, self.peak, self.warmup_steps, decayed))


@dataclass(frozen=True)
class Cosine(_WarmupDecay):
    _shape: ClassVar[str] = "cosine"


@dataclass(frozen=True)
class LinearDecay(_WarmupDecay):
    _shape: ClassVar[str] = "linear"


@dataclass(frozen=True)
class WSD:
    peak: float
    total_steps: int
    warmup_steps: int
    decay_steps: int
    min_ratio: float = 0.0
    shape: Literal["linear", "cosine", "sqrt"] = "linear"

    def __post_init__(self):
        _check_peak(self.peak, self.warmup_steps, self.min_ratio)
        _require(self.decay_steps >= 0, "decay_steps", f"must be >= 0, got {self.decay_steps}")
        _require(self.warmup_steps + self.decay_steps <= self.total_steps, "total_steps",
                 f"must be >= warmup_steps + decay_steps = {self.warmup_steps + self.decay_steps},"
                 f" got {self.total_steps}")
        _require(self.shape in ("linear", "cosine", "sqrt"), "shape",
                 f"must be 'linear', 'cosine' or 'sqrt', got {self.shape!r}")

    def __call__(self, step: Step) -> Union[float, Tensor]:
        s = _steps(step)
        start = self.total_steps - self.decay_steps
        remaining = _remaining(_progress(s, start, self.decay_steps), self.shape)
        floor = self.peak * self.min_ratio
        value = floor + (self.peak - floor) * torch.where(s < start, torch.ones_like(s), remaining)
        if self.decay_steps == 0:  # no decay phase: the step after the end stays at peak
            value = torch.full_like(s, self.peak)
        return _result(step, _after_warmup(s, self.peak, self.warmup_steps, value))


@dataclass(frozen=True)
class Join:
    schedules: tuple
    boundaries: tuple

    def __post_init__(self):
        _require(len(self.schedules) == len(self.boundaries) + 1, "boundaries",
                 f"need len(schedules) - 1 = {len(self.schedules) - 1} boundaries, "
                 f"got {len(self.boundaries)}")
        _require(list(self.boundaries) == sorted(self.boundaries), "boundaries",
                 f"must be increasing, got {self.boundaries}")

    def __call__(self, step: Step) -> Union[float, Tensor]:
        s = _steps(step)
        starts = (0, *self.boundaries)
        value = _steps(self.schedules[0](s))
        for start, schedule in zip(starts[1:], self.schedules[1:]):
            value = torch.where(s >= start, _steps(schedule(s - start)), value)
        return _result(step, value)


def constant(value: float) -> Constant:
    return Constant(float(value))


def warmup_constant(peak: float, warmup_steps: int) -> WarmupConstant:
    return WarmupConstant(float(peak), int(warmup_steps))


def cosine(peak: float, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> Cosine:
    return Cosine(float(peak), int(total_steps), int(warmup_steps), float(min_ratio))


def linear_decay(
    peak: float, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0
) -> LinearDecay:
    return LinearDecay(float(peak), int(total_steps), int(warmup_steps), float(min_ratio))


def wsd(
    peak: float,
    total_steps: int,
    warmup_steps: int,
    decay_steps: int,
    min_ratio: float = 0.0,
    shape: Literal["linear", "cosine", "sqrt"] = "linear",
) -> WSD:
    return WSD(float(peak), int(total_steps), int(warmup_steps), int(decay_steps),
               float(min_ratio), shape)


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Join:
    return Join(tuple(schedules), tuple(int(b) for b in boundaries))
