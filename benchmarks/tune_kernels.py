"""Sweep the launch shapes of fastllm's memory-bound kernels on one GPU (one call, a short table).

    python benchmarks/tune_kernels.py [--only norms,rotary,...]

For each kernel and each (tile, warps) choice: median time (``triton.testing.do_bench``), GB/s and
share of the measured copy bandwidth, counting the bytes the kernel must move (the same counts as
``benchmarks/kernels.py``), and the relative error against the torch reference, so a fast but wrong
variant shows. The module constants that hold the defaults are patched per variant and restored.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triton.testing import do_bench  # noqa: E402

ROWS = []
COPY = [0.0]


def bench(fn) -> float:
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def rel(got, want) -> float:
    got, want = got.float(), want.float()
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


def report(kernel, config, ms, nbytes, err=float("nan")):
    gbps = nbytes / ms / 1e6
    pct = 100 * gbps / COPY[0] if COPY[0] else 0.0
    line = f"{kernel:<22} {config:<34} {ms:8.4f} ms {gbps:7.0f} GB/s {pct:5.1f}%  err {err:.1e}"
    print(line, flush=True)
    ROWS.append((kernel, config, ms, pct, err))


@contextlib.contextmanager
def patched(module, **values):
    old = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def attempt(kernel, config, thunk):
    try:
        thunk()
    except Exception as error:  # a variant that fails to compile is reported, not fatal
        print(f"{kernel:<22} {config:<34} FAILED {type(error).__name__}: {str(error)[:160]}", flush=True)


def copy_ceiling(dev):
    src = torch.randn(1 << 29, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    COPY[0] = 2 * src.nbytes / ms / 1e6
    print(f"copy ceiling {COPY[0]:.0f} GB/s", flush=True)


def tune_norms(dev):
    from fastllm.kernels import norm

    rows, dim = 32768, 4096
    x = torch.randn(rows, dim, device=dev, dtype=torch.bfloat16)
    w = 1 + 0.1 * torch.randn(dim, device=dev, dtype=torch.bfloat16)
    b = 0.1 * torch.randn(dim, device=dev, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    size = x.numel() * 2
    for rms in (True, False):
        name = "rms_norm" if rms else "layer_norm"
        bias = None if rms else b
        ref = norm.rms_norm_reference(x, w, 1e-6) if rms else norm.layer_norm_reference(x, w, b, 1e-6)
        for r, nw in itertools.product((1, 2, 4), (4, 8, 16)):
            def run(r=r, nw=nw):
                fn = lambda: norm._forward(x, w, bias, 1e-6, rms, rows_per_program=r, num_warps=nw)  # noqa: E731
                report(name + " fwd", f"rows={r} warps={nw}", bench(fn), 2 * size, rel(fn()[0], ref))
            attempt(name + " fwd", f"rows={r} warps={nw}", run)
        _, mean, rstd = norm._forward(x, w, bias, 1e-6, rms)
        xx, ww, bb = (t.clone().float().requires_grad_() for t in (x, w, b))
        out = norm.rms_norm_reference(xx, ww, 1e-6) if rms else norm.layer_norm_reference(xx, ww, bb, 1e-6)
        want = torch.autograd.grad(out, (xx, ww), dy.float())
        for t, nw, per_sm in itertools.product((1, 2, 4), (8, 16), (2, 4)):
            def run(t=t, nw=nw, per_sm=per_sm):
                fn = lambda: norm._backward(dy, x, w, mean, rstd, has_bias=not rms, rms=rms, tile_rows=t,  # noqa: E731
                                            num_warps=nw, per_sm=per_sm)
                got = fn()
                err = max(rel(got[0], want[0]), rel(got[1], want[1]))
                report(name + " bwd", f"tile={t} warps={nw} per_sm={per_sm}", bench(fn), 3 * size, err)
            attempt(name + " bwd", f"tile={t} warps={nw} per_sm={per_sm}", run)


def tune_rotary(dev):
    from fastllm.kernels import rotary

    batch, heads, kv, seq, hd = 8, 32, 8, 4096, 128
    q = torch.randn(batch, heads, seq, hd, device=dev, dtype=torch.bfloat16)
    k = torch.randn(batch, kv, seq, hd, device=dev, dtype=torch.bfloat16)
    angles = torch.arange(seq, device=dev)[:, None] * (1e-4 ** torch.linspace(0, 1, hd // 2, device=dev))
    angles = torch.cat([angles, angles], -1)[None]
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    want = rotary.apply_rotary_reference(q, k, cos, sin)
    moved = 2 * (q.numel() + k.numel()) * 2
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    for bs, nw in itertools.product((8, 16, 32, 64), (2, 4, 8)):
        for backward in (False, True):
            label = f"block_s={bs} warps={nw}"
            kernel = "rotary " + ("bwd" if backward else "fwd")

            def run(bs=bs, nw=nw, backward=backward):
                fn = lambda: rotary._launch(q, k, qo, ko, cos, sin, backward, block_s=bs, num_warps=nw)  # noqa: E731
                fn()
                err = float("nan") if backward else max(rel(qo, want[0]), rel(ko, want[1]))
                report(kernel, label, bench(fn), moved, err)
            attempt(kernel, label, run)


def tune_activations(dev):
    import fastllm.kernels.activation  # noqa: F401  (the package re-exports a function of that name)
    act = sys.modules["fastllm.kernels.activation"]

    rows, dim = 16384, 14336
    gate = torch.randn(rows, dim, device=dev, dtype=torch.bfloat16)
    up = torch.randn_like(gate)
    dh = torch.randn_like(gate)
    size = gate.numel() * 2
    for block, nw in itertools.product((1024, 2048, 4096), (4, 8)):
        label = f"block={block} warps={nw}"
        with patched(act, _BLOCK=block, _WARPS=nw):
            for name, code, gated in (("swiglu", 0, True), ("geglu(tanh)", 2, True), ("gelu", 1, False)):
                u = up if gated else None
                ref = act.gated_reference(gate, up, act.ACTIVATIONS[code]) if gated else \
                    act.activation_reference(gate, act.ACTIVATIONS[code])

                def run(u=u, code=code, name=name, ref=ref, gated=gated):
                    fwd = lambda: act._Activation.forward(gate, u, code, True)  # noqa: E731
                    report(name + " fwd", label, bench(fwd), (3 if gated else 2) * size, rel(fwd()[0], ref))
                    bwd = lambda: act._backward_pass(dh, gate, u, None, None, act_code=code, recompute=True)  # noqa: E731
                    report(name + " bwd", label, bench(bwd), (5 if gated else 3) * size)
                attempt(name, label, run)
            _, a, da = act._Activation.forward(gate, up, 0, False)

            def run_store():
                bwd = lambda: act._backward_pass(dh, gate, up, a, da, act_code=0, recompute=False)  # noqa: E731
                report("swiglu(store) bwd", label, bench(bwd), 6 * size)
            attempt("swiglu(store) bwd", label, run_store)
            del a, da


def tune_optim(dev):
    from fastllm.kernels import optim

    n, numel = 128, 1 << 21
    master = [torch.randn(numel, device=dev) for _ in range(n)]
    params = [m.to(torch.bfloat16) for m in master]
    grads = [torch.randn(numel, device=dev, dtype=torch.bfloat16) for _ in range(n)]
    m = [torch.zeros_like(x) for x in master]
    v = [torch.zeros_like(x) for x in master]
    total = n * numel
    want_norm = optim.global_norm_reference(grads)
    for block, nw in itertools.product((1024, 2048, 4096), (4, 8, 16)):
        label = f"block={block} warps={nw}"
        with patched(optim, _BLOCK=block, _WARPS=nw, _NORM_BLOCK=block, _NORM_WARPS=nw):
            def run():
                fn = lambda: optim.adamw_step(params, grads, m, v, master, lr=1e-4, weight_decay=0.1,  # noqa: E731
                                              step=10, impl="triton")
                report("adamw step", label, bench(fn), 28 * total)
                norm = lambda: optim.global_norm(grads, impl="triton")  # noqa: E731
                report("grad_norm", label, bench(norm), 2 * total, rel(norm(), want_norm))
            attempt("optim", label, run)
    fp32 = [torch.nn.Parameter(x.clone()) for x in master]
    for p, g in zip(fp32, grads):
        p.grad = g.float()
    opt = torch.optim.AdamW(fp32, lr=1e-4, weight_decay=0.1, fused=True)
    report("adamw step", "torch fused (fp32 p/g)", bench(opt.step), 28 * total)


def tune_moe(dev):
    from fastllm import kernels
    from fastllm.kernels import moe

    tokens, top_k, experts, embed = 16384, 2, 8, 4096
    choice = torch.rand(tokens, experts, device=dev).topk(top_k, dim=-1).indices
    routing = kernels.make_routing(choice, experts)
    x = torch.randn(tokens, embed, device=dev, dtype=torch.bfloat16)
    rows = tokens * top_k
    ys = torch.randn(rows, embed, device=dev, dtype=torch.bfloat16)
    weights = torch.rand(tokens, top_k, device=dev)
    want_x = moe.moe_dispatch_reference(x, routing)
    want_y = moe.moe_combine_reference(ys, weights, routing)
    for r, nw in itertools.product((1, 2, 4), (4, 8, 16)):
        label = f"rows={r} warps={nw}"
        with patched(moe, _GATHER_ROWS=r, _GATHER_WARPS=nw, _SUM_WARPS=nw):
            def run():
                fn = lambda: kernels.moe_dispatch(x, routing, impl="triton")  # noqa: E731
                report("moe_dispatch", label, bench(fn), 2 * rows * embed * 2, rel(fn(), want_x))
                if r == 1:
                    fn = lambda: kernels.moe_combine(ys, weights, routing, impl="triton")  # noqa: E731
                    report("moe_combine", f"warps={nw}", bench(fn), (rows + tokens) * embed * 2, rel(fn(), want_y))
            attempt("moe", label, run)


def tune_attention(dev):
    import fastllm.kernels.attention  # noqa: F401
    att = sys.modules["fastllm.kernels.attention"]
    from torch.nn.attention.flex_attention import create_block_mask

    b, h, kv, s, d = 4, 32, 8, 4096, 128
    q = torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, kv, s, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    segments = (torch.arange(s, device=dev) * 4 // s).expand(b, s).contiguous()
    for label, kwargs in (("window=1024", dict(window=1024)), ("4 documents", dict(segment_ids=segments))):
        fn = lambda: att.attention(q, k, v, impl="triton", **kwargs)  # noqa: E731
        want = att.attention(q, k, v, impl="torch", **kwargs)
        err = rel(fn(), want)
        ms = bench(fn)
        print(f"attention {label:<14} fwd cached mask {ms:8.4f} ms  err {err:.1e}", flush=True)
    causal = lambda: att.attention(q, k, v, impl="triton")  # noqa: E731
    print(f"attention causal        fwd             {bench(causal):8.4f} ms", flush=True)
    mod = att._mask_mod(None, segments)
    for compiled in (False, True):
        t0 = time.perf_counter()
        create_block_mask(mod, b, None, s, s, device=dev, _compile=compiled)
        first = time.perf_counter() - t0
        ms = bench(lambda: create_block_mask(mod, b, None, s, s, device=dev, _compile=compiled))
        print(f"block mask build (4 docs, _compile={compiled}): {ms:8.3f} ms (first {first:.2f} s)", flush=True)
    fresh = lambda: att.attention(q, k, v, impl="triton", segment_ids=segments.clone())  # noqa: E731
    print(f"attention 4 documents fwd, new segment_ids each call {bench(fresh):8.4f} ms", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="norms,rotary,activations,optim,moe,attention")
    args = parser.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    started = time.perf_counter()
    copy_ceiling(dev)
    suites = dict(norms=tune_norms, rotary=tune_rotary, activations=tune_activations, optim=tune_optim,
                  moe=tune_moe, attention=tune_attention)
    for name in args.only.split(","):
        try:
            suites[name](dev)
        except Exception as error:
            print(f"suite {name} failed: {type(error).__name__}: {error}", flush=True)
        torch.cuda.empty_cache()
        print(f"-- {name} done at {time.perf_counter() - started:.0f} s", flush=True)
    print("\nBEST per kernel (error-free variants):")
    best = {}
    for kernel, config, ms, pct, err in ROWS:
        if not (err == err) or err < 5e-2:  # nan: no check for this row
            if kernel not in best or ms < best[kernel][1]:
                best[kernel] = (config, ms, pct)
    for kernel, (config, ms, pct) in best.items():
        print(f"  {kernel:<22} {config:<34} {ms:8.4f} ms {pct:5.1f}%")


if __name__ == "__main__":
    main()
