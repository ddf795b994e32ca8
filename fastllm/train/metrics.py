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


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan; keep the line parseable
    return value


def _python_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    return value


class MetricsLog:
    """Appends one JSON object per line to ``path``, and never loses what an earlier run wrote.

    A run that starts at step ``start_step`` (0, or the step of the checkpoint it resumed from)
    keeps every earlier record up to that step (``kept``) and drops only the records past it: they
    describe steps this run does again. A line cut short by a killed process is dropped too. The
    file is rewritten through a temporary file and a rename, so a kill during the rewrite leaves
    the old file or the new one. Non-finite values are written as the strings ``"nan"``/``"inf"``
    (JSON has no such numbers) and read back as floats."""

    def __init__(self, path: str | os.PathLike, start_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        records = [r for r in map(_parse, lines) if r is not None]
        self.kept = [r for r in records if r.get("step", 0) <= start_step]
        if len(self.kept) != len(lines):
            tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(json.dumps(_line(r)) + "\n" for r in self.kept))
            os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append ``record`` (tensors read as numbers); returns it as numbers (nan stays a float)."""
        record = {name: _python_value(value) for name, value in record.items()}
        with self.path.open("a") as file:
            file.write(json.dumps(_line(record)) + "\n")
        return record


def _line(record: dict[str, Any]) -> dict[str, Any]:
    return {name: _json_value(value) for name, value in record.items()}


def _parse(line: str) -> Optional[dict[str, Any]]:
    """One record, or ``None`` for a blank or broken line (cut short when its writer was killed)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    return {name: _NON_FINITE.get(value, value) if isinstance(value, str) else value
            for name, value in record.items()}


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order (non-finite values as floats; a line cut
    short by a killed writer is skipped)."""
    return [r for r in map(_parse, Path(path).read_text().splitlines()) if r is not None]
