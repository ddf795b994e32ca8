"""Throughput and model-FLOPs utilisation, and the ``metrics.jsonl`` log.

MFU (Chowdhery et al. 2022, PaLM appendix B) = achieved model FLOP/s over the hardware peak:
``tokens_per_s * flops_per_token / peak`` with ``flops_per_token`` from
:func:`fastllm.models.flops_per_token` (6N + attention, DESIGN.md) and the peak of an H100/H200 in
dense bf16, 989 TFLOP/s. It is only reported on a GPU; a CPU has no comparable peak.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["PEAK_FLOPS", "Throughput", "mfu", "MetricsLog", "read_metrics"]

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16


def mfu(tokens_per_s: float, flops_per_token: float, peak: float = PEAK_FLOPS) -> float:
    return tokens_per_s * flops_per_token / peak


class Throughput:
    """Tokens per second between consecutive :meth:`measure` calls (syncing the device first)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def measure(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.start, self.tokens = now, 0
        return rate


def _json_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan; keep the line parseable
    return value


class MetricsLog:
    """Appends one JSON object per line to ``path``; on resume, lines past ``resume_step`` (written
    after the checkpoint the run resumes from) are dropped so the log reads as one clean run."""

    def __init__(self, path: str | os.PathLike, resume_step: Optional[int] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        line = {name: _json_value(value) for name, value in record.items()}
        with self.path.open("a") as file:
            file.write(json.dumps(line) + "\n")
        return line


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
