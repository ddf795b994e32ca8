"""Benchmark every fastllm kernel against torch eager, torch.compile and Liger-Kernel (when present).

    python benchmarks/kernels.py --out docs/kernels_table.md          # one H100/H200, ~5 min
    python benchmarks/kernels.py --dry-run --out /tmp/kernels.md      # CPU, tiny shapes, interpreter

Prints one JSON line per (kernel, variant, implementation): median time, achieved GB/s (memory-bound
kernels, with the share of the measured copy bandwidth) or TFLOP/s (matmul-bound ones), and the
peak memory the call allocated beyond its inputs. The copy bandwidth ceiling is measured first
(``dst.copy_(src)`` on 1 GiB, read + write bytes). Peers that are missing or fail are reported with
a note and skipped; nothing stops the run. The markdown table goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class Case:
    kernel: str
    variant: str  # "fwd", "bwd", "fwd+bwd", "step", ...
    impl: str  # "fastllm", "eager", "compile", "liger", ...
    run: Callable[[], object]  # the timed call; a setup error is raised by make()
    bytes: float = 0.0  # memory-bound: bytes that must move
    flops: float = 0.0  # compute-bound: useful FLOPs
    shape: str = ""


@dataclass
class Bench:
    device: torch.device
    warmup: int
    reps: int
    compile: bool = True
    copy_gbps: Optional[float] = None
    rows: list = field(default_factory=list)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn, batches: int = 5, per_batch: int = 10) -> float:
        """Median over ``batches`` of the mean device time of ``per_batch`` calls queued back to back
        (events around the batch, one sync after it): a training step's view, where the host runs
        ahead of the device, so Python launch overhead is hidden unless it exceeds the kernel."""
        for _ in range(self.warmup):
            fn()
        self.sync()
        if self.device.type != "cuda":
            return self.sync_ms(fn)
        times = []
        for _ in range(batches):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_batch):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / per_batch)
        return statistics.median(times)

    def sync_ms(self, fn) -> float:
        """Median of single calls, each synchronised: device time plus whatever host time (Python,
        launch, autograd engine) precedes the first kernel. Reported beside ``time_ms``."""
        times = []
        for _ in range(self.reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)

    def peak_mib(self, fn) -> Optional[float]:
        if self.device.type != "cuda":
            return None
        self.sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def record(self, case: Case, note: str = ""):
        row = {"kernel": case.kernel, "variant": case.variant, "impl": case.impl, "shape": case.shape}
        try:
            ms = self.time_ms(case.run)
            row["ms"] = round(ms, 4)
            row["ms_sync"] = round(self.sync_ms(case.run), 4)
            if case.bytes:
                row["gbps"] = round(case.bytes / ms / 1e6, 1)
                if self.copy_gbps:
                    row["pct_of_copy"] = round(100 * row["gbps"] / self.copy_gbps, 1)
            if case.flops:
                row["tflops"] = round(case.flops / ms / 1e9, 1)
            row["peak_mib"] = None if (p := self.peak_mib(case.run)) is None else round(p, 1)
        except Exception as error:  # a failing peer must not stop the run
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            if case.impl == "fastllm":
                traceback.print_exc()
        if note:
            row["note"] = note
        print(json.dumps(row), flush=True)
        self.rows.append(row)

    def skip(self, kernel: str, variant: str, impl: str, note: str):
        row = {"kernel": kernel, "variant": variant, "impl": impl, "skipped": note}
        print(json.dumps(row), flush=True)
        self.rows.append(row)


# ----------------------------------------------------------------------------- peers


def liger():
    """The Liger-Kernel ops module, or None."""
    try:
        import liger_kernel.ops as _  # noqa: F401

        return __import__("liger_kernel.transformers.functional", fromlist=["_"])
    except Exception:
        return None


def compiled(fn, bench: Bench):
    if bench.device.type != "cuda" or not bench.compile:
        return None  # Inductor on a shared 2-core CPU would take minutes per case
    try:
        return torch.compile(fn)
    except Exception:
        return None


def grad_of(fn, inputs):
    """A callable running backward of ``fn(*inputs)`` (forward done once, graph retained)."""
    out = fn(*inputs)
    outs = tuple(out) if isinstance(out, tuple) else (out,)
    cotangents = [torch.randn_like(o) for o in outs]
    leaves = [x for x in inputs if torch.is_tensor(x) and x.requires_grad]
    return lambda: torch.autograd.grad(outs, leaves, cotangents, retain_graph=True)


def max_error(fn, reference, inputs) -> str:
    """A correctness note for the table: largest |fastllm - reference| relative to max |reference|."""
    try:
        with torch.no_grad():
            got, want = fn(*inputs), reference(*inputs)
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        errors = [((g.float() - w.float()).abs().max() / w.float().abs().max().clamp(min=1e-30)).item()
                  for g, w in zip(got, want)]
        return f"rel. err vs eager {max(errors):.1e}"
    except Exception as error:
        return f"check failed: {type(error).__name__}: {error}"[:200]


def fwd_bwd_cases(bench, kernel, shape, impls: dict, inputs, fwd_bytes, bwd_bytes):
    """fwd and bwd cases for each implementation ``impls[name] = fn(*inputs)``."""
    check = max_error(impls["fastllm"], impls["eager"], fresh(inputs)) if "eager" in impls else ""
    for name, fn in impls.items():
        if fn is None:
            bench.skip(kernel, "fwd", name, "not available")
            continue
        args = fresh(inputs)  # Liger's backward overwrites its inputs in place: no one sees its leftovers
        bench.record(Case(kernel, "fwd", name, lambda fn=fn, args=args: fn(*args), bytes=fwd_bytes, shape=shape),
                     note=check if name == "fastllm" else "")
        try:
            backward = grad_of(fn, args)
        except Exception as error:
            bench.skip(kernel, "bwd", name, f"{type(error).__name__}: {error}"[:200])
            continue
        bench.record(Case(kernel, "bwd", name, backward, bytes=bwd_bytes, shape=shape))


def _param(t):
    return t.detach().requires_grad_()


def fresh(inputs):
    """Private copies of the differentiable inputs for one implementation."""
    return tuple(_param(x.detach().clone()) if torch.is_tensor(x) and x.requires_grad else x for x in inputs)


# ----------------------------------------------------------------------------- kernels


def bench_copy(bench: Bench, n: int):
    src = torch.empty(n, dtype=torch.bfloat16, device=bench.device).normal_()
    dst = torch.empty_like(src)
    case = Case("copy", "ceiling", "torch", lambda: dst.copy_(src), bytes=2 * src.nbytes, shape=f"[{n}] bf16")
    ms = bench.time_ms(case.run)
    bench.copy_gbps = case.bytes / ms / 1e6
    bench.record(case)


def bench_cast(bench: Bench, rows: int, dim: int):
    """bf16 -> fp32 (the gradients before a float32 reduce-scatter)."""
    from fastllm import kernels

    x = torch.randn(rows, dim, device=bench.device, dtype=torch.bfloat16)
    shape, nbytes = f"[{rows}, {dim}] bf16 -> fp32", x.numel() * 6
    bench.record(Case("cast", "fwd", "fastllm", lambda: kernels.cast(x, torch.float32), bytes=nbytes, shape=shape))
    bench.record(Case("cast", "fwd", "eager", lambda: x.float(), bytes=nbytes, shape=shape))


def bench_norms(bench: Bench, rows: int, dim: int):
    from fastllm import kernels
    from fastllm.kernels import norm

    dev, lig = bench.device, liger()
    x = _param(torch.randn(rows, dim, device=dev, dtype=torch.bfloat16))
    w = _param(1 + 0.1 * torch.randn(dim, device=dev, dtype=torch.bfloat16))
    b = _param(0.1 * torch.randn(dim, device=dev, dtype=torch.bfloat16))
    size = x.numel() * x.element_size()
    shape = f"[{rows}, {dim}] bf16"
    rms_ref = lambda x, w: norm.rms_norm_reference(x, w, 1e-6)  # noqa: E731
    fwd_bwd_cases(bench, "rms_norm", shape, {
        "fastllm": lambda x, w: kernels.rms_norm(x, w, 1e-6, impl="triton"),
        "eager": rms_ref, "compile": compiled(rms_ref, bench),
        "liger": (lambda x, w: lig.liger_rms_norm(x, w, 1e-6)) if lig else None,
    }, (x, w), 2 * size, 3 * size)
    ln_ref = lambda x, w, b: F.layer_norm(x, (dim,), w, b, 1e-5)  # noqa: E731
    fwd_bwd_cases(bench, "layer_norm", shape, {
        "fastllm": lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5, impl="triton"),
        "eager": ln_ref, "compile": compiled(ln_ref, bench),
        "liger": (lambda x, w, b: lig.liger_layer_norm(x, w, b, 1e-5)) if lig else None,
    }, (x, w, b), 2 * size, 3 * size)


def bench_activations(bench: Bench, rows: int, dim: int):
    from fastllm import kernels
    from fastllm.kernels.activation import gated_reference, activation_reference

    dev, lig = bench.device, liger()
    gate = _param(torch.randn(rows, dim, device=dev, dtype=torch.bfloat16))
    up = _param(torch.randn(rows, dim, device=dev, dtype=torch.bfloat16))
    size = gate.numel() * gate.element_size()
    shape = f"[{rows}, {dim}] bf16"
    for recompute in (True, False):
        variant_name = "swiglu" if recompute else "swiglu(store)"
        impls = {"fastllm": lambda g, u, r=recompute: kernels.swiglu(g, u, recompute=r, impl="triton")}
        if recompute:
            ref = lambda g, u: gated_reference(g, u, "silu")  # noqa: E731
            impls.update(eager=ref, compile=compiled(ref, bench),
                         liger=(lambda g, u: lig.liger_swiglu(g, u)) if lig else None)
        # recompute: fwd reads 2 writes 1, bwd reads 3 writes 2; store: fwd also writes act and
        # act', bwd reads them instead of recomputing (dh, up, act, act' in; dgate, dup out)
        fwd_bwd_cases(bench, variant_name, shape, impls, (gate, up), (3 if recompute else 5) * size,
                      (5 if recompute else 6) * size)
    ref = lambda g, u: gated_reference(g, u, "gelu_tanh")  # noqa: E731
    fwd_bwd_cases(bench, "geglu(tanh)", shape, {
        "fastllm": lambda g, u: kernels.geglu(g, u, approximate=True, impl="triton"),
        "eager": ref, "compile": compiled(ref, bench),
        "liger": (lambda g, u: lig.liger_geglu(g, u)) if lig else None,
    }, (gate, up), 3 * size, 5 * size)
    ref = lambda x: activation_reference(x, "gelu")  # noqa: E731
    fwd_bwd_cases(bench, "gelu", shape, {
        "fastllm": lambda x: kernels.gelu(x, impl="triton"), "eager": ref, "compile": compiled(ref, bench),
    }, (gate,), 2 * size, 3 * size)


def bench_rotary(bench: Bench, batch: int, heads: int, kv_heads: int, seq: int, head_dim: int):
    from fastllm import kernels
    from fastllm.kernels.rotary import apply_rotary_reference

    dev, lig = bench.device, liger()
    q = _param(torch.randn(batch, heads, seq, head_dim, device=dev, dtype=torch.bfloat16))
    k = _param(torch.randn(batch, kv_heads, seq, head_dim, device=dev, dtype=torch.bfloat16))
    angles = torch.arange(seq, device=dev)[:, None] * (1e-4 ** torch.linspace(0, 1, head_dim // 2, device=dev))
    angles = torch.cat([angles, angles], -1)[None]  # [1, seq, head_dim]
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    moved = 2 * (q.numel() + k.numel()) * q.element_size()
    fwd_bwd_cases(bench, "rotary", f"q[{batch},{heads},{seq},{head_dim}] k[..{kv_heads}..] bf16", {
        "fastllm": lambda q, k: kernels.apply_rotary(q, k, cos, sin, impl="triton"),
        "eager": lambda q, k: apply_rotary_reference(q, k, cos, sin),
        "compile": compiled(lambda q, k: apply_rotary_reference(q, k, cos, sin), bench),
        "liger": (lambda q, k: lig.liger_rope(q, k, cos, sin)) if lig else None,
    }, (q, k), moved, moved)


def bench_cross_entropy(bench: Bench, tokens: int, embed: int, vocab: int):
    from fastllm import kernels

    dev, lig = bench.device, liger()
    h = _param(torch.randn(tokens, embed, device=dev, dtype=torch.bfloat16))
    w = _param(0.02 * torch.randn(vocab, embed, device=dev, dtype=torch.bfloat16))
    t = torch.randint(0, vocab, (tokens,), device=dev)
    flops = 3 * 2 * tokens * vocab * embed  # logits, dh, dW

    def unfused(h, w):
        return F.cross_entropy(F.linear(h, w).float(), t)

    def step(loss_fn):
        def run():
            loss = loss_fn(h, w)
            loss = loss[0] if isinstance(loss, tuple) else loss
            return torch.autograd.grad(loss, (h, w))
        return run

    impls = {
        "fastllm": lambda h, w: kernels.fused_linear_cross_entropy(h, w, t, impl="triton"),
        "eager": unfused, "compile": compiled(unfused, bench),
        "liger": (lambda h, w: lig.liger_fused_linear_cross_entropy(h, w, t)) if lig else None,
    }
    shape = f"tokens={tokens} embed={embed} vocab={vocab} bf16"
    check = max_error(impls["fastllm"], unfused, (h, w))
    for name, fn in impls.items():
        if fn is None:
            bench.skip("linear_cross_entropy", "fwd+bwd", name, "not available")
            continue
        bench.record(Case("linear_cross_entropy", "fwd+bwd", name, step(fn), flops=flops, shape=shape),
                     note=check if name == "fastllm" else "")


def bench_optim(bench: Bench, n_tensors: int, numel: int):
    from fastllm import kernels

    dev = bench.device
    master = [torch.randn(numel, device=dev) for _ in range(n_tensors)]
    params = [m.to(torch.bfloat16) for m in master]
    grads = [torch.randn(numel, device=dev, dtype=torch.bfloat16) for _ in range(n_tensors)]
    m = [torch.zeros_like(x) for x in master]
    v = [torch.zeros_like(x) for x in master]
    total = n_tensors * numel
    shape = f"{n_tensors} x {numel} (bf16 params, fp32 master/moments)"
    copies = {impl: [[t.clone() for t in ts[:2]] for ts in (params, grads, m, v, master)]
              for impl in ("triton", "torch")}
    for impl, (p_, g_, m_, v_, w_) in copies.items():
        kernels.adamw_step(p_, g_, m_, v_, w_, lr=1e-2, weight_decay=0.1, step=3, impl=impl)
    adam_check = max_error(lambda: tuple(copies["triton"][4]), lambda: tuple(copies["torch"][4]), ())
    del copies
    # read g(2) w(4) m(4) v(4), write w m v (12) and the bf16 copy (2)
    bench.record(Case("adamw", "step", "fastllm", lambda: kernels.adamw_step(
        params, grads, m, v, master, lr=1e-4, weight_decay=0.1, step=10, impl="triton"),
        bytes=28 * total, shape=shape), note=adam_check)
    fp32 = [torch.nn.Parameter(x.clone()) for x in master]
    for p, g in zip(fp32, grads):
        p.grad = g.float()
    for name, options in (("torch fused", dict(fused=True)), ("torch foreach", dict(foreach=True))):
        try:
            opt = torch.optim.AdamW(fp32, lr=1e-4, weight_decay=0.1, **options)
        except Exception as error:
            bench.skip("adamw", "step", name, str(error)[:200])
            continue
        # fp32 params and grads: read p g m v (16), write p m v (12): the same 28 bytes/element
        bench.record(Case("adamw", "step", name, opt.step, bytes=28 * total, shape=shape + " [fp32 p/g]"))
    bench.record(Case("grad_norm", "norm", "fastllm", lambda: kernels.global_norm(grads, impl="triton"),
                      bytes=2 * total, shape=f"{n_tensors} x {numel} bf16"), note=max_error(
        lambda: kernels.global_norm(grads, impl="triton"), lambda: kernels.global_norm(grads, impl="torch"), ()))
    bench.record(Case("grad_norm", "norm", "torch foreach", lambda: torch.linalg.vector_norm(
        torch.stack(torch._foreach_norm(grads))), bytes=2 * total, shape=f"{n_tensors} x {numel} bf16"))


def bench_moe(bench: Bench, tokens: int, top_k: int, experts: int, embed: int, mlp: int):
    from fastllm import kernels
    from fastllm.kernels.grouped_matmul import grouped_matmul_reference

    dev = bench.device
    choice = torch.rand(tokens, experts, device=dev).topk(top_k, dim=-1).indices
    routing = kernels.make_routing(choice, experts)
    x = _param(torch.randn(tokens, embed, device=dev, dtype=torch.bfloat16))
    rows = tokens * top_k
    xs = _param(torch.randn(rows, embed, device=dev, dtype=torch.bfloat16))
    w = _param(0.02 * torch.randn(experts, mlp, embed, device=dev, dtype=torch.bfloat16))
    shape = f"rows={rows} experts={experts} {embed}->{mlp} bf16"
    flops = 2 * rows * mlp * embed
    impls = {"fastllm": lambda xs, w: kernels.grouped_matmul(xs, w, routing.offsets, impl="triton"),
             "eager loop": lambda xs, w: grouped_matmul_reference(xs, w, routing.offsets)}
    grouped_mm = getattr(torch, "_grouped_mm", None)
    if grouped_mm is not None and dev.type == "cuda":
        ends = routing.offsets[1:].to(torch.int32)
        impls["torch._grouped_mm"] = lambda xs, w: grouped_mm(xs, w.transpose(-2, -1), offs=ends)
    check = max_error(impls["fastllm"], impls["eager loop"], (xs, w))
    for name, fn in impls.items():
        bench.record(Case("grouped_matmul", "fwd", name, lambda fn=fn: fn(xs, w), flops=flops, shape=shape),
                     note=check if name == "fastllm" else "")
        try:
            bench.record(Case("grouped_matmul", "bwd", name, grad_of(fn, (xs, w)), flops=2 * flops, shape=shape))
        except Exception as error:
            bench.skip("grouped_matmul", "bwd", name, f"{type(error).__name__}: {error}"[:200])
    weights = torch.rand(tokens, top_k, device=dev)
    moved = 2 * rows * embed * x.element_size()  # read + write every dispatched row
    bench.record(Case("moe_dispatch", "fwd", "fastllm", lambda: kernels.moe_dispatch(x, routing, impl="triton"),
                      bytes=moved, shape=shape), note=max_error(
        lambda x: kernels.moe_dispatch(x, routing, impl="triton"),
        lambda x: kernels.moe_dispatch(x, routing, impl="torch"), (x,)))
    bench.record(Case("moe_dispatch", "fwd", "eager", lambda: kernels.moe_dispatch(x, routing, impl="torch"),
                      bytes=moved, shape=shape))
    ys = xs.detach()
    combined = (rows + tokens) * embed * x.element_size()
    bench.record(Case("moe_combine", "fwd", "fastllm", lambda: kernels.moe_combine(ys, weights, routing, impl="triton"),
                      bytes=combined, shape=shape), note=max_error(
        lambda y: kernels.moe_combine(y, weights, routing, impl="triton"),
        lambda y: kernels.moe_combine(y, weights, routing, impl="torch"), (ys,)))
    bench.record(Case("moe_combine", "fwd", "eager", lambda: kernels.moe_combine(ys, weights, routing, impl="torch"),
                      bytes=combined, shape=shape))


def bench_fp8(bench: Bench, shapes: list[tuple[int, int, int]]):
    """One projection ``[tokens, in] x [out, in]``, forward and backward, in FP8 (``fp8_linear``,
    compiled as in a compiled block: the amax, scale and cast fuse) against bf16 ``F.linear``."""
    import torch.nn.functional as F

    from fastllm import kernels

    dev = bench.device
    fp8 = compiled(kernels.fp8_linear, bench) or kernels.fp8_linear
    for tokens, d_in, d_out in shapes:
        x = _param(torch.randn(tokens, d_in, device=dev, dtype=torch.bfloat16))
        w = _param(0.02 * torch.randn(d_out, d_in, device=dev, dtype=torch.bfloat16))
        shape, flops = f"[{tokens}, {d_in}] x [{d_out}, {d_in}] bf16", 2 * tokens * d_in * d_out
        impls = {"fastllm": fp8, "eager": lambda x, w: F.linear(x, w),
                 "compile": compiled(lambda x, w: F.linear(x, w), bench)}
        check = max_error(impls["fastllm"], impls["eager"], (x, w))  # FP8's rounding: percent-level
        for name, fn in impls.items():
            if fn is None:
                bench.skip("fp8_linear", "fwd", name, "not available")
                continue
            bench.record(Case("fp8_linear", "fwd", name, lambda fn=fn: fn(x, w), flops=flops, shape=shape),
                         note=check if name == "fastllm" else "")
            bench.record(Case("fp8_linear", "bwd", name, grad_of(fn, (x, w)), flops=2 * flops, shape=shape))


def bench_attention(bench: Bench, batch: int, heads: int, kv_heads: int, seq: int, head_dim: int, window: int):
    from fastllm import kernels

    dev = bench.device
    q = _param(torch.randn(batch, heads, seq, head_dim, device=dev, dtype=torch.bfloat16))
    k = _param(torch.randn(batch, kv_heads, seq, head_dim, device=dev, dtype=torch.bfloat16))
    v = _param(torch.randn(batch, kv_heads, seq, head_dim, device=dev, dtype=torch.bfloat16))
    segments = (torch.arange(seq, device=dev) * 4 // seq).expand(batch, seq)  # 4 packed documents
    for mask, kwargs, pairs in (
        ("causal", {}, seq * (seq + 1) / 2),
        (f"window={window}", {"window": window}, sum(min(i + 1, window) for i in range(seq))),
        ("4 documents", {"segment_ids": segments}, 4 * (seq // 4) * (seq // 4 + 1) / 2),
    ):
        flops = 4 * batch * heads * head_dim * pairs
        shape = f"b={batch} h={heads} kv={kv_heads} s={seq} d={head_dim} {mask}"
        if dev.type != "cuda" and mask != "causal":
            bench.skip("attention", "fwd+bwd", "fastllm", "FlexAttention has no CPU backward")
            continue
        check = max_error(lambda: kernels.attention(q, k, v, impl="triton", **kwargs),
                          lambda: kernels.attention(q, k, v, impl="torch", **kwargs), ())
        for name, impl in (("fastllm", "triton"), ("eager masked SDPA", "torch")):
            fn = lambda impl=impl, kw=kwargs: kernels.attention(q, k, v, impl=impl, **kw)  # noqa: E731
            bench.record(Case(f"attention[{mask}]", "fwd", name, fn, flops=flops, shape=shape),
                         note=check if name == "fastllm" else "")
            if name == "fastllm" and "segment_ids" in kwargs:  # the first layer of a step builds the mask
                bench.record(Case(f"attention[{mask}]", "fwd (new segment_ids)", name, lambda: kernels.attention(
                    q, k, v, impl="triton", segment_ids=segments.clone()), flops=flops, shape=shape),
                    note="block mask built in the timed call; later layers reuse it")
            try:
                bench.record(Case(f"attention[{mask}]", "bwd", name, grad_of(lambda q, k, v: fn(), (q, k, v)),
                                  flops=2.5 * flops, shape=shape))
            except Exception as error:
                bench.skip(f"attention[{mask}]", "bwd", name, f"{type(error).__name__}: {error}"[:200])
    if dev.type == "cuda":
        bench_sdpa_backends(bench, q, k, v)


def bench_sdpa_backends(bench: Bench, q, k, v):
    """Causal attention on each fused SDPA backend PyTorch has here, k/v shared per group
    (``enable_gqa``) or expanded to every head first (the expansion is timed with it)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, heads, seq, head_dim = q.shape
    flops = 4 * batch * heads * head_dim * seq * (seq + 1) / 2
    shape = f"b={batch} h={heads} kv={k.shape[1]} s={seq} d={head_dim} causal"
    groups = heads // k.shape[1]

    def expanded(q, k, v):
        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def shared(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    with torch.no_grad():
        reference = expanded(q.float(), k.float(), v.float())
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for kv, fn in (("gqa", shared), ("expanded k/v", expanded)):
            name = f"sdpa {backend.name.lower()} ({kv})"

            def run(q, k, v, fn=fn, backend=backend):
                with sdpa_kernel(backend):
                    return fn(q, k, v)

            try:
                with torch.no_grad():
                    error = (run(q, k, v).float() - reference).abs().max().item() / reference.abs().max().item()
                bench.record(Case("attention[causal]", "fwd", name, lambda: run(q, k, v), flops=flops, shape=shape),
                             note=f"rel. err vs fp32 {error:.1e}")
                bench.record(Case("attention[causal]", "bwd", name, grad_of(run, (q, k, v)),
                                  flops=2.5 * flops, shape=shape))
            except Exception as error:  # a backend that refuses these inputs
                bench.skip("attention[causal]", "fwd+bwd", name, f"{type(error).__name__}: {error}"[:200])


# ----------------------------------------------------------------------------- report


def markdown(bench: Bench, command: str) -> str:
    device = torch.cuda.get_device_name() if bench.device.type == "cuda" else "cpu (dry run)"
    lines = [f"Device: {device}; torch {torch.__version__}; command: `{command}`", "",
             f"Copy bandwidth ceiling: {bench.copy_gbps or 0:.0f} GB/s", "",
             "ms: median device time per call with calls queued back to back (GB/s, % copy and TFLOP/s "
             "use it); ms sync: one call at a time, synchronised, so host-side launch and autograd "
             "overhead are included.", "",
             "| kernel | pass | impl | shape | ms | ms sync | GB/s | % copy | TFLOP/s | peak MiB | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in bench.rows:
        note = r.get("skipped") or r.get("error") or r.get("note", "")
        cells = [r["kernel"], r["variant"], r["impl"], r.get("shape", ""), r.get("ms", ""), r.get("ms_sync", ""),
                 r.get("gbps", ""),
                 r.get("pct_of_copy", ""), r.get("tflops", ""), r.get("peak_mib", ""), note]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="markdown table path")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU through Triton's interpreter")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="start no new suite after this many seconds (the table is still written)")
    parser.add_argument("--only", default="", help="comma-separated subset: cast,norms,activations,rotary,"
                        "cross_entropy,optim,moe,attention,fp8")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        device, warmup, reps = torch.device("cpu"), 0, 1
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: use --dry-run on CPU")
        device, warmup, reps = torch.device("cuda"), 5, 10
    torch.manual_seed(0)
    bench = Bench(device, warmup, reps, compile=not args.no_compile)
    started = time.perf_counter()
    tiny = args.dry_run
    suites = {
        "cast": lambda: bench_cast(bench, *((5, 1000) if tiny else (14336, 4096))),
        "norms": lambda: bench_norms(bench, *((6, 100) if tiny else (32768, 4096))),
        "activations": lambda: bench_activations(bench, *((3, 130) if tiny else (16384, 14336))),
        # Two sizes: the smaller one's backward is short enough (~0.25 ms) for autograd's host
        # overhead per call to show; the larger one is the "large size" the 70% bar speaks of.
        "rotary": lambda: [bench_rotary(bench, *shape) for shape in (
            [(1, 4, 2, 5, 16)] if tiny else [(8, 32, 8, 4096, 128), (16, 32, 8, 8192, 128)])],
        "cross_entropy": lambda: bench_cross_entropy(bench, *((16, 32, 1000) if tiny else (16384, 4096, 128256))),
        "optim": lambda: bench_optim(bench, *((3, 70000) if tiny else (128, 1 << 21))),
        "moe": lambda: bench_moe(bench, *((12, 2, 4, 32, 48) if tiny else (16384, 2, 8, 4096, 14336))),
        "attention": lambda: bench_attention(bench, *((1, 4, 2, 32, 16, 8) if tiny else (4, 32, 8, 4096, 128, 1024))),
        # the 8B block's widest and narrowest projections, SmolLM2's widest
        "fp8": lambda: bench_fp8(bench, [(32, 48, 64)] if tiny else [(8192, 4096, 14336), (8192, 4096, 1024),
                                                                     (131072, 576, 1536)]),
    }
    chosen = [s for s in args.only.split(",") if s] or list(suites)
    bench_copy(bench, 1 << 12 if tiny else 1 << 29)
    for name in chosen:
        elapsed = time.perf_counter() - started
        if elapsed > args.budget_s:
            bench.skip(name, "-", "-", f"time budget ({args.budget_s:.0f} s) spent after {elapsed:.0f} s")
            continue
        try:
            suites[name]()
            print(json.dumps({"suite": name, "elapsed_s": round(time.perf_counter() - started, 1)}),
                  flush=True)
        except Exception:
            traceback.print_exc()
            bench.skip(name, "-", "-", "suite failed to set up (traceback on stderr)")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    command = "python benchmarks/kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(bench, command))
    failed = [r for r in bench.rows if r["impl"] == "fastllm" and "error" in r]
    print(json.dumps({"summary": True, "rows": len(bench.rows), "fastllm_errors": len(failed)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
