"""The GPU suite: skipped, each test with its reason, wherever it cannot run as meant.

Run it with ``python tests/gpu/run.py`` (docs/development.md, "Running the GPU suite"), which sets
``TRITON_INTERPRET=0`` and ``FASTLLM_TYPECHECK=0`` before anything imports Triton or fastllm. Under
plain pytest on a CPU machine (CI) every test here is skipped; ``gpus(n)`` marks a test that needs
``n`` GPUs, ``cuda_only`` one that cannot run on CPU at all. With ``FASTLLM_GPU_EVENTS=path`` set
(run.py sets it), each test's start and result go to that file as JSON lines as they happen, so a
crash loses nothing already reported.

``FASTLLM_GPU_DRY_RUN=1`` (``run.py --dry-run``) runs the tests on the CPU instead, the kernels in
Triton's interpreter: a check of the suite's own code before a GPU machine is spent on it, not of
the GPU (``cuda_only`` tests skip).
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))  # helpers: compare, check

from helpers import seeded  # noqa: E402


DRY_RUN = os.environ.get("FASTLLM_GPU_DRY_RUN") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpus(n): needs n CUDA devices (default 1)")
    config.addinivalue_line("markers", "cuda_only(why): cannot run on CPU even in a dry run")
    config.addinivalue_line("markers", "compiles: runs torch.compile over fastllm code (FASTLLM_TYPECHECK=0)")


def _why_not(item) -> str | None:
    """The reason this test cannot run here, or None."""
    return _why_not_on_this_machine(item) or _why_not_in_this_process(item)


def _why_not_on_this_machine(item) -> str | None:
    if DRY_RUN:
        marker = item.get_closest_marker("cuda_only")
        return f"dry run on CPU: {marker.args[0]}" if marker else None
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (run python tests/gpu/run.py on a GPU machine)"
    marker = item.get_closest_marker("gpus")
    wanted = marker.args[0] if marker else 1
    if torch.cuda.device_count() < wanted:
        return f"needs {wanted} GPUs, torch.cuda.device_count() = {torch.cuda.device_count()}"
    return None


def _why_not_in_this_process(item) -> str | None:
    """The settings that tests/conftest.py gives the CPU suite, wrong for this one (run.py fixes both)."""
    from fastllm.kernels import _triton

    if not DRY_RUN and _triton.interpreting():  # then triton.jit made every kernel an interpreted one at import
        return ("TRITON_INTERPRET=1 (tests/conftest.py's default for the CPU suite) would interpret the "
                "kernels: run python tests/gpu/run.py, or set TRITON_INTERPRET=0")
    if item.get_closest_marker("compiles") and os.environ.get("FASTLLM_TYPECHECK") == "1":
        return ("FASTLLM_TYPECHECK=1 (tests/conftest.py's default): dynamo cannot trace the runtime shape "
                "checks; run python tests/gpu/run.py, which sets FASTLLM_TYPECHECK=0")
    return None


def pytest_runtest_setup(item):
    reason = _why_not(item)
    if reason:
        pytest.skip(reason)


@pytest.fixture
def gen(request) -> torch.Generator:
    return seeded(request.node.nodeid)


@pytest.fixture
def device() -> torch.device:
    """Where the tests put their tensors: the GPU, or the CPU in a dry run."""
    return torch.device("cpu" if DRY_RUN else "cuda")


class _Events:
    """Appends ``{"event": "start"|"end", ...}`` lines to ``FASTLLM_GPU_EVENTS`` (see run.py)."""

    def __init__(self, path: str):
        self.path, self.started, self.outcome, self.note = path, {}, {}, {}

    def write(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def start(self, nodeid: str) -> None:
        self.started[nodeid] = time.perf_counter()
        self.write(event="start", nodeid=nodeid)

    def report(self, report) -> None:
        if report.failed or (report.skipped and report.nodeid not in self.outcome):
            self.outcome[report.nodeid] = "failed" if report.failed else "skipped"
            self.note[report.nodeid] = _note(report)
        if report.when == "teardown":
            seconds = time.perf_counter() - self.started.get(report.nodeid, time.perf_counter())
            self.write(event="end", nodeid=report.nodeid, outcome=self.outcome.get(report.nodeid, "passed"),
                       seconds=round(seconds, 1), note=self.note.get(report.nodeid, ""))


def _note(report) -> str:
    """The skip reason, or the first error line of a failure (pytest's ``E`` lines)."""
    if report.skipped and isinstance(report.longrepr, tuple):
        return report.longrepr[2].removeprefix("Skipped: ")
    text = report.longreprtext.strip()
    errors = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    return (errors[0] if errors else text.splitlines()[-1] if text else "")[:300]


_EVENTS = _Events(os.environ["FASTLLM_GPU_EVENTS"]) if os.environ.get("FASTLLM_GPU_EVENTS") else None


def pytest_runtest_logstart(nodeid, location):
    if _EVENTS:
        _EVENTS.start(nodeid)


def pytest_runtest_logreport(report):
    if _EVENTS:
        _EVENTS.report(report)
