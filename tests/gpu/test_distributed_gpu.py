"""The NCCL checks of tests/distributed, under torchrun, on every GPU pair this machine has (2 or 4 ranks).

``nccl_checks.py``: every collective against one process. ``nccl_partitioner.py``: every layout of
the partitioner trains like one process, the overlapped ZeRO-3 layouts with the copy-engine transport
(the default on one host, ``check_overlap`` asserts every block was gathered that way) and again over
NCCL. NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends, set by run.py if unset).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gpus(2), pytest.mark.cuda_only("NCCL")]


def _torchrun(script: str, timeout_s: float = 280) -> None:  # under run.py's --test-timeout-s
    ranks = 4 if torch.cuda.device_count() >= 4 else 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               str(ROOT / script)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    output = result.stdout + result.stderr
    summary = [line for line in output.splitlines() if " ok" in line or "FAILED" in line]
    assert result.returncode == 0, f"{script} on {ranks} ranks exited {result.returncode}: " + (
        " | ".join(summary[-8:]) or output[-2000:])


def test_nccl_collectives():
    _torchrun("tests/distributed/nccl_checks.py")


def test_nccl_partitioner_and_copy_engines():
    _torchrun("tests/distributed/nccl_partitioner.py")
