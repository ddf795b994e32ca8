"""Launching Triton kernels: compiled on CUDA, through Triton's interpreter on CPU.

Triton decides compiled-or-interpreted when a ``@triton.jit`` function is *defined*, so an import
order where ``TRITON_INTERPRET=1`` is set too late would silently break CPU tests. We decide at
*launch* instead: CUDA tensors go to the compiled kernel; CPU tensors go to Triton's interpreter,
but only when ``TRITON_INTERPRET=1`` is set (tests set it), so a production run never interprets
by accident.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

__all__ = ["available", "interpreting", "launch", "row_block", "warps_for", "jit", "reduction_programs", "cdiv", "tl",
           "accumulator", "upcast"]

try:  # Triton is optional: the torch reference covers every op.
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    _IMPORT_ERROR: Exception | None = None
except Exception as error:  # pragma: no cover - exercised only where triton is absent
    import types

    triton = None
    tl = types.SimpleNamespace(constexpr=None)  # lets kernel signatures still be defined
    InterpretedFunction = None
    _IMPORT_ERROR = error


def available() -> bool:
    """True when ``triton`` imports."""
    return triton is not None


def interpreting() -> bool:
    """True when the environment asks for Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def jit(fn):
    """``triton.jit`` when Triton is importable, else the plain function (never launched then).

    The runtime shape-check hook (``FASTLLM_TYPECHECK=1``) wraps every function of the package;
    Triton must see the original, whose globals hold the other kernels, so we unwrap first.
    """
    fn = inspect.unwrap(fn)
    return triton.jit(fn) if triton is not None else fn


def launch(kernel, grid: tuple[int, ...], device: torch.device, *args: Any, **meta: Any) -> None:
    """Run ``kernel[grid](*args, **meta)``: compiled for CUDA tensors, interpreted for CPU ones."""
    if triton is None:
        raise RuntimeError(f"the Triton kernel path needs the triton package: {_IMPORT_ERROR}")
    if device.type == "meta":  # shapes only: planning runs a kernel's bookkeeping, not its maths (fastllm.train.plan)
        return
    if device.type == "cuda":
        kernel[grid](*args, **meta)
        return
    if not interpreting():
        raise RuntimeError(
            f"Triton kernel {getattr(kernel, '__name__', kernel)} got {device.type} tensors: set "
            "TRITON_INTERPRET=1 to run it in Triton's interpreter, or choose the 'torch' kernels"
        )
    meta.pop("num_warps", None)  # compiler hints mean nothing to the interpreter
    meta.pop("num_stages", None)
    function = kernel if isinstance(kernel, InterpretedFunction) else InterpretedFunction(kernel.fn)
    function[grid](*args, **meta)


def row_block(width: int) -> int:
    """Power-of-two block covering a whole row (one program per row keeps reductions in registers)."""
    return triton.next_power_of_2(int(width)) if triton is not None else 1 << (int(width) - 1).bit_length()


def warps_for(block: int, element_size: int = 2) -> int:
    """Enough warps that each thread holds ~16 bytes per load: 128-bit vectorised accesses."""
    elements_per_thread = max(1, 16 // element_size)
    return int(min(16, max(1, block // (32 * elements_per_thread))))


def reduction_programs(device: torch.device, work: int, per_sm: int = 2) -> int:
    """Programs for a loop-over-work reduction (norm weight gradients): ``per_sm`` per SM, 4 on CPU."""
    if device.type == "cuda":
        return max(1, min(work, per_sm * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(work, 4))


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def accumulator(dtype: torch.dtype):
    """Kernel arithmetic dtype: fp32 for fp32/16-bit inputs, fp64 for fp64 (so gradcheck is exact)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def upcast(t: torch.Tensor) -> torch.Tensor:
    """The reference's arithmetic precision: at least fp32."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _Plain(torch.autograd.Function):
    """Calls ``fn`` on the tensors inside an autograd.Function: under ``torch.func`` transforms the
    inputs of a Function's forward are unwrapped, so Triton sees real storage, not TensorWrappers."""

    @staticmethod
    def forward(fn, *tensors):
        return fn(*tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("fastllm kernels' backward passes are not differentiable again")


def plain(fn, *tensors):
    """``fn(*tensors)`` on plain tensors (use for kernel launches inside a backward)."""
    return _Plain.apply(fn, *tensors)
