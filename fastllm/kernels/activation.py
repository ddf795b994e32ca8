"""Activations and gated linear units (GLU variants, Shazeer 2020), fused forward and backward.

    plain:  h = act(x)                      dx = dh * act'(x)
    gated:  h = act(gate) * up              dgate = dh * up * act'(gate),  dup = dh * act(gate)

``act`` is ``silu`` (SwiGLU), ``gelu`` (exact erf GELU, GeGLU), ``gelu_tanh`` (tanh approximation,
GPT-2's ``gelu_new``) or ``relu``, with transformers' definitions. One elementwise pass reads the
inputs and writes the output in the input dtype; arithmetic is fp32. With ``recompute=True`` (the
default) backward recomputes act and act' from the saved inputs, storing nothing extra; with
``recompute=False`` forward also stores act(gate) and act'(gate) so backward only multiplies
(two extra activation-sized tensors kept alive until backward).
"""

import functools
import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from fastllm.kernels import _triton
from fastllm.kernels._triton import tl
from fastllm.kernels.registry import Choice, resolve

__all__ = ["ACTIVATIONS", "activation", "gated", "gelu", "swiglu", "geglu", "activation_reference",
           "gated_reference"]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
# H100 sweep at [16384, 14336] bf16: 2048 elements and 4 warps per program (two 16-byte accesses per
# thread and tensor) gave 95-101% of copy bandwidth for every activation, forward and backward.
_BLOCK = 2048
_WARPS = 4


def activation_reference(x: Tensor, name: str) -> Tensor:
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[name](x)


def gated_reference(gate: Tensor, up: Tensor, name: str) -> Tensor:
    return activation_reference(gate, name) * up


@_triton.jit
def _act_and_grad(x, ACT: tl.constexpr):
    """(act(x), act'(x)) in the arithmetic dtype; ACT: 0 silu, 1 gelu, 2 gelu_tanh, 3 relu."""
    if ACT == 0:
        s = tl.sigmoid(x)
        a = x * s
        da = s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        a = x * cdf
        da = cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACT == 2:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh(inner)
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
        a = 0.5 * x * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner
    else:
        positive = x > 0
        a = tl.where(positive, x, 0.0)
        da = tl.where(positive, 1.0, 0.0)
    return a, da


@_triton.jit
def _forward(X, UP, OUT, A, DA, n, ACT: tl.constexpr, GATED: tl.constexpr, STORE: tl.constexpr,
             BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    a, da = _act_and_grad(x, ACT)
    h = a
    if GATED:
        h = a * tl.load(UP + offs, mask=mask, other=0.0).to(ACC)
    tl.store(OUT + offs, h.to(OUT.dtype.element_ty), mask=mask)
    if STORE:
        tl.store(A + offs, a.to(A.dtype.element_ty), mask=mask)
        tl.store(DA + offs, da.to(DA.dtype.element_ty), mask=mask)


@_triton.jit
def _backward(DH, X, UP, A, DA, DX, DUP, n, ACT: tl.constexpr, GATED: tl.constexpr,
              STORED: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(ACC)
    if STORED:
        a = tl.load(A + offs, mask=mask, other=0.0).to(ACC)
        da = tl.load(DA + offs, mask=mask, other=0.0).to(ACC)
    else:
        a, da = _act_and_grad(tl.load(X + offs, mask=mask, other=0.0).to(ACC), ACT)
    if GATED:
        up = tl.load(UP + offs, mask=mask, other=0.0).to(ACC)
        tl.store(DUP + offs, (dh * a).to(DUP.dtype.element_ty), mask=mask)
        dh = dh * up
    tl.store(DX + offs, (dh * da).to(DX.dtype.element_ty), mask=mask)


def _launch(kernel, n: int, like: Tensor, *args, block: int = 0, num_warps: int = 0, **meta) -> None:
    block = block or _BLOCK
    _triton.launch(kernel, (_triton.cdiv(n, block),), like.device, *args, n, BLOCK=block,
                   ACC=_triton.accumulator(like.dtype), num_warps=num_warps or _WARPS, **meta)


class _Activation(torch.autograd.Function):
    """``act(x)`` (``up is None``) or ``act(x) * up`` over the elementwise Triton kernels."""

    @staticmethod
    def forward(x, up, act_code, recompute):
        x = x.contiguous()
        up = None if up is None else up.contiguous()
        out = torch.empty_like(x)
        a, da = (out, out) if recompute else (torch.empty_like(x), torch.empty_like(x))
        _launch(_forward, x.numel(), x, x, x if up is None else up, out, a, da,
                ACT=act_code, GATED=up is not None, STORE=not recompute)
        return out, (None if recompute else a), (None if recompute else da)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, up, act_code, recompute = inputs
        _, a, da = output
        ctx.save_for_backward(x, up, a, da)
        ctx.act_code, ctx.recompute = act_code, recompute
        if a is not None:
            ctx.mark_non_differentiable(a, da)

    @staticmethod
    def backward(ctx, dh, *_):
        x, up, a, da = ctx.saved_tensors
        dx, dup = _triton.plain(functools.partial(_backward_pass, act_code=ctx.act_code,
                                                  recompute=ctx.recompute), dh, x, up, a, da)
        return dx, dup, None, None


def _backward_pass(dh, x, up, a, da, *, act_code: int, recompute: bool):
    dh = dh.contiguous()
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dup = None if up is None else torch.empty_like(dx)
    _launch(_backward, dx.numel(), dx, dh, x, dx if up is None else up,
            dx if a is None else a, dx if da is None else da, dx, dx if dup is None else dup,
            ACT=act_code, GATED=up is not None, STORED=not recompute)
    return dx, dup


def _code(name: str) -> int:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {ACTIVATIONS}")
    return ACTIVATIONS.index(name)


def activation(x: Float[Tensor, "*shape"], name: str, *, recompute: bool = True,
               impl: Choice = "auto") -> Float[Tensor, "*shape"]:
    """``act(x)`` for ``name`` in :data:`ACTIVATIONS`."""
    code = _code(name)
    if resolve(impl, x.device) == "torch":
        return activation_reference(x, name)
    return _Activation.apply(x, None, code, recompute)[0]


def gated(gate: Float[Tensor, "*shape"], up: Float[Tensor, "*shape"], name: str, *,
          recompute: bool = True, impl: Choice = "auto") -> Float[Tensor, "*shape"]:
    """``act(gate) * up``: SwiGLU for ``"silu"``, GeGLU for ``"gelu"``/``"gelu_tanh"``."""
    code = _code(name)
    if gate.shape != up.shape:
        raise ValueError(f"gated activation: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    if resolve(impl, gate.device) == "torch":
        return gated_reference(gate, up, name)
    return _Activation.apply(gate, up, code, recompute)[0]


def swiglu(gate: Float[Tensor, "*shape"], up: Float[Tensor, "*shape"], *, recompute: bool = True,
           impl: Choice = "auto") -> Float[Tensor, "*shape"]:
    return gated(gate, up, "silu", recompute=recompute, impl=impl)


def geglu(gate: Float[Tensor, "*shape"], up: Float[Tensor, "*shape"], *, approximate: bool = False,
          recompute: bool = True, impl: Choice = "auto") -> Float[Tensor, "*shape"]:
    return gated(gate, up, "gelu_tanh" if approximate else "gelu", recompute=recompute, impl=impl)


def gelu(x: Float[Tensor, "*shape"], *, approximate: bool = False, recompute: bool = True,
         impl: Choice = "auto") -> Float[Tensor, "*shape"]:
    return activation(x, "gelu_tanh" if approximate else "gelu", recompute=recompute, impl=impl)


assert math.isclose(0.3989422804014327, 1 / math.sqrt(2 * math.pi))  # the GELU pdf constant
