"""Shared tolerances and a forward+backward comparison of a kernel with its reference."""

import torch

# Kernels compute in fp32 and round once; the reference rounds in other places. bf16 keeps 8 bits.
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10),
             torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def compare(fn, inputs, dtype, tolerance=None, seed=0):
    """fn(*inputs, impl) with impl 'triton' vs 'torch': outputs and input gradients."""
    tol = tolerance or TOLERANCE[dtype]
    results = {}
    for impl in ("triton", "torch"):
        leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) if torch.is_tensor(x) else x
                  for x in inputs]
        out = fn(*leaves, impl=impl)
        outs = out if isinstance(out, tuple) else (out,)
        gen = torch.Generator().manual_seed(seed)
        cotangents = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
        wrt = [x for x in leaves if torch.is_tensor(x) and x.requires_grad]
        grads = torch.autograd.grad(outs, wrt, cotangents, allow_unused=True)
        results[impl] = (outs, grads)
    (outs, grads), (ref_outs, ref_grads) = results["triton"], results["torch"]
    for got, want in zip(outs, ref_outs):
        torch.testing.assert_close(got.float(), want.float(), **tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want.float(), **tol)
