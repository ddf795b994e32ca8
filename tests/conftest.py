"""Test-suite settings: runtime shape checks on, one thread per process, deterministic algorithms."""

import os

os.environ.setdefault("FASTLLM_TYPECHECK", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Triton kernels chosen explicitly ("triton") run in Triton's interpreter on CPU; "auto" never does
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
