"""A kernel against its reference computed in float64 from the same inputs, forward and backward.

``compare(fn, inputs, dtype)`` rounds the inputs to ``dtype``, runs ``fn(..., impl="triton")`` on
them (the kernel), and runs ``fn(..., impl="torch")`` (the reference) on the same rounded values
upcast to float64, so the reference carries no rounding of its own; then it checks the outputs and
the input gradients of one seeded cotangent with :func:`check`.

The bound, per tensor, with ``scale = max |exact|``::

    |got - exact| <= rtol |exact| + atol scale         (float64, float32: TOLERANCE)

``atol`` is relative to the tensor's scale so a gradient of a mean loss (entries ~1e-4) is held to
the same relative precision as an output of magnitude 1. bf16 keeps 8 significant bits, so its
rule is relative to the torch reference run in bf16 on the same inputs: the kernel's largest error
may exceed the reference's by at most ``bf16_steps`` bf16 steps at the tensor's largest value, and
each element's error may exceed the reference's there by ``TOLERANCE[bf16]`` of its value plus half
that allowance.
"""

from __future__ import annotations

import zlib
from typing import Callable, NamedTuple

import pytest
import torch

# fp64: the kernels compute in fp64 when their inputs are fp64, so only the order of sums differs
# (~1e-16 a term). fp32: one rounding is 6e-8 relative; every kernel case here stays within a
# quarter of this bound (measured; the worst, the fused loss's dW, sums 4099 exps), while an RMSNorm
# with eps 1e-4 for 1e-6 (5e-5 relative) fails it. bf16: see _check_bf16; its rtol is the one these
# tests had (then kernel against bf16 reference, with an absolute 3e-2 that fails on longer sums).
TOLERANCE = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
             torch.bfloat16: dict(rtol=3e-2)}
# One bf16 step (2^-7 relative at the bottom of a binade) beyond the reference's largest error:
# Triton's interpreter truncates when it stores bf16 (a whole step off, not half; compiled kernels
# round to nearest). A kernel that rounds in between as well (RMSNorm, the MoE chain) passes
# bf16_steps=2.
BF16_STEP = 2.0**-7


def seeded(name: str) -> torch.Generator:
    """A generator seeded from ``name`` (a test's id): reproducible draws, different for each test."""
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


class Constant(NamedTuple):
    """An input of ``compare`` that is rounded like the others but gets no gradient (rotary's cos/sin)."""

    tensor: torch.Tensor


def check(got: torch.Tensor, exact: torch.Tensor, *, dtype: torch.dtype | None = None,
          reference: torch.Tensor | None = None, tolerance: dict | None = None, scale: float | None = None,
          bf16_steps: int = 1, what: str = "") -> None:
    """``got``, computed from ``dtype`` inputs (default: its own dtype; a bf16 loss may come out in
    fp32), against ``exact`` (float64); bf16 needs ``reference``, the torch reference run in bf16.
    ``scale`` replaces ``max |exact|`` (for a tensor that is zero in exact arithmetic)."""
    if got is None or exact is None:
        assert got is None and exact is None, f"{what}: one side has no gradient"
        return
    assert got.shape == exact.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(exact.shape)}"
    exact = exact.to(got.device, torch.float64)
    if scale is None:
        scale = exact.abs().max().item() if exact.numel() else 0.0
        scale = scale if scale > 0 else 1.0
    dtype = dtype or got.dtype
    tol = tolerance or TOLERANCE[dtype]
    if dtype == torch.bfloat16:
        assert reference is not None, f"{what}: a bf16 check needs the bf16 reference"
        _check_bf16(got.double(), exact, reference.to(got.device, torch.float64), scale, tol, bf16_steps, what)
        return
    torch.testing.assert_close(got.double() / scale, exact / scale, rtol=tol["rtol"], atol=tol["atol"],
                               msg=lambda m: f"{what} (scale {scale:.3g}): {m}")


def _check_bf16(got, exact, reference, scale: float, tol: dict, steps: int, what: str) -> None:
    """The largest error at most the reference's plus ``steps`` bf16 steps at the largest value; each
    element's error at most the reference's there plus ``rtol`` of the value plus half that
    allowance. Against the reference's error, not the reference: on long sums the bf16 reference is
    the less accurate of the two, and a kernel must not fail for being closer to the exact value."""
    kernel_error, reference_error = (got - exact).abs(), (reference - exact).abs()
    allowance = steps * BF16_STEP * scale
    assert kernel_error.max() <= reference_error.max() + allowance, (
        f"{what}: bf16 error {kernel_error.max():.3g} > the bf16 reference's {reference_error.max():.3g} "
        f"+ {allowance:.3g}")
    excess = kernel_error - reference_error - (tol["rtol"] * exact.abs() + allowance / 2)
    assert (excess <= 0).all(), (f"{what}: {int((excess > 0).sum())} elements' bf16 error exceeds the bf16 "
                                 f"reference's there by more than {tol['rtol']} of the value + {allowance / 2:.3g}")


def _leaf(x, dtype: torch.dtype, compute: torch.dtype, grad: bool):
    """``x`` rounded to ``dtype``, held in ``compute``: a fresh leaf wanting a gradient unless Constant."""
    if isinstance(x, Constant):
        return x.tensor.to(dtype).to(compute)
    if torch.is_tensor(x) and x.is_floating_point():
        return x.detach().to(dtype).to(compute).requires_grad_(grad)
    return x


def run(fn: Callable, inputs, dtype: torch.dtype, impl: str, *, compute: torch.dtype | None = None,
        seed: int = 0, grad: bool = True) -> dict[str, torch.Tensor | None]:
    """The outputs and input gradients, by name, of ``fn(*inputs, impl=impl)``: the inputs rounded to
    ``dtype``, computed in ``compute`` (default ``dtype``); the cotangent drawn from ``seed``, rounded
    likewise. ``grad=False``: the outputs only."""
    compute = compute or dtype
    leaves = [_leaf(x, dtype, compute, grad) for x in inputs]
    out = fn(*leaves, impl=impl)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(dtype).to(o.device, o.dtype)
                  for o in outs]
    wrt = [x for x in leaves if torch.is_tensor(x) and x.requires_grad]
    grads = torch.autograd.grad(outs, wrt, cotangents, allow_unused=True) if wrt else ()
    names = [f"output {i}" for i in range(len(outs))] + [f"gradient of input {i}" for i, x in enumerate(leaves)
                                                         if torch.is_tensor(x) and x.requires_grad]
    return dict(zip(names, [o.detach() for o in outs] + list(grads)))


def compare(fn: Callable, inputs, dtype: torch.dtype, *, tolerance: dict | None = None, seed: int = 0,
            grad: bool = True, bf16_steps: int = 1) -> None:
    """The kernel (``impl="triton"``) in ``dtype`` against the float64 reference of the same inputs:
    every output and every input gradient (for one seeded cotangent), each with :func:`check`.
    ``grad=False`` compares the outputs only (FlexAttention has no CPU backward)."""
    options = dict(seed=seed, grad=grad)
    got = run(fn, inputs, dtype, "triton", **options)
    exact = run(fn, inputs, dtype, "torch", compute=torch.float64, **options)
    same_dtype = run(fn, inputs, dtype, "torch", **options) if dtype == torch.bfloat16 else {}
    assert got.keys() == exact.keys(), f"the kernel gives {list(got)}, the reference {list(exact)}"
    for name in got:
        check(got[name], exact[name], dtype=dtype, reference=same_dtype.get(name), tolerance=tolerance,
              bf16_steps=bf16_steps, what=name)


def check_trees(got: dict, exact: dict, what: str) -> None:
    """Every tensor of a flat ``{path: tensor}`` (a model's gradients) with :func:`check`. A tensor
    whose exact value is zero up to rounding (GPT-2's key bias: softmax ignores a per-query shift)
    is held to the largest scale of the tree instead of its own noise."""
    assert got.keys() == exact.keys(), f"{what}: different paths"
    largest = max(e.abs().max().item() for e in exact.values())
    for path, e in exact.items():
        vanishing = e.abs().max().item() <= 1e-9 * largest
        check(got[path], e, scale=largest if vanishing else None, what=f"{what} {path}")


def planted(right: Callable, wrong: Callable) -> Callable:
    """``fn`` for :func:`compare` whose kernel side is ``wrong`` and whose reference is ``right``."""
    return lambda *args, impl: (wrong if impl == "triton" else right)(*args, impl=impl)


def assert_caught(fn: Callable, inputs, dtype: torch.dtype, **options) -> None:
    """A planted bug: :func:`compare` must fail on it, in the values (a check that passes anything
    proves nothing; one that fails for another reason, a shape or a missing gradient, proves little)."""
    with pytest.raises(AssertionError, match="not close|bf16 error|exceeds the bf16"):
        compare(fn, inputs, dtype, **options)
