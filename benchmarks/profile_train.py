"""Where a step of ``fastllm train RECIPE [overrides]`` spends its device time, and how far its
matmuls are from the matmul ceiling measured on the same device in the same call.

    python benchmarks/profile_train.py recipes/smollm2_135m.py --data DIR train.compile=true
    python benchmarks/profile_train.py recipes/llama3_8b.py --data DIR model.n_layers=4 mesh.data=1 zero.stage=0 \
        train.batch_size=2 data.seq_len=4096 train.compile=true train.remat=none
    python benchmarks/profile_train.py recipes/llama3_8b.py --data DIR model.preset=tiny-llama model.vocab_size=8192 \
        data.seq_len=128 train.batch_size=4 mesh.data=1 zero.stage=0 --steps 4 --profile 3-4   # CPU smoke test

* The step profiled is the user's: ``python -m fastllm train`` with ``log.profile_steps=FIRST,LAST``
  (the Trainer's torch profiler writes a Chrome trace of those steps to the run directory).
* Device kernels are grouped by name (ms and calls per step, share of the busy time) and by kind:
  matmul, attention, optimizer, Triton (compiled or hand-written fused kernels), copy, communication,
  other. ``busy`` is the kernels' time per step; ``span`` the profiled wall time per step.
* The matmul ceiling: every ``aten::mm/addmm/addmm_/bmm/baddbmm/_scaled_mm/_grouped_mm`` of the trace (FP8
  projections call ``_scaled_mm``, MoE experts ``_grouped_mm`` on Hopper) with its input dims, strides and
  dtypes (2*M*N*K FLOPs each; a grouped GEMM is re-timed with groups of equal size, since the trace
  does not record the routing), each distinct one re-run alone on the same device (timed as
  benchmarks/kernels.py times kernels: calls queued back to back), so ``matmul_vs_alone`` is the time the step's matmuls took over the time the
  same matmuls take in isolation; ``dense_tflops`` is an 8192^3 bf16 matmul's rate, the device's
  practical peak.

Prints the top kernels as a markdown table and one JSON line.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]  # see train_vs_peer.py
_spec = importlib.util.spec_from_file_location("benchmarks_train_vs_peer", HERE / "train_vs_peer.py")
train_vs_peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_vs_peer)  # its train command and sibling loader
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm",
              "aten::_grouped_mm")
GROUPED = "aten::_grouped_mm"  # the experts' GEMM: rows (or, for the weight gradient, the contraction) in groups
SCALED = "aten::_scaled_mm"  # FP8 operands, each with its own dtype (e4m3 or e5m2)
WITH_ADDEND = ("aten::addmm", "aten::addmm_", "aten::baddbmm")  # the added tensor comes first
# Checked in order: the first kind whose pattern a kernel's lowercased name matches.
KINDS = (("communication", r"nccl"),
         ("attention", r"flash|fmha|sdpa|attention|attn"),
         ("optimizer", r"adam|multi_tensor|_optim|optimizer|sum_squares"),  # sum_squares: the gradient norm
         ("matmul", r"gemm|nvjet|cutlass|xmma|wgmma|splitk"),
         ("copy", r"memcpy|memset"),
         ("triton", r"^triton|^_"),
         ("other", r""))
DTYPES = {"float": "float32", "c10::BFloat16": "bfloat16", "c10::Half": "float16", "double": "float64",
          "c10::Float8_e4m3fn": "float8_e4m3fn", "c10::Float8_e5m2": "float8_e5m2"}


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next(kind for kind, pattern in KINDS if re.search(pattern, name))


def summarize(trace: dict, steps: int) -> dict:
    """The per-step kernel table, per-kind totals and the matmul ops of a Chrome trace of ``steps`` steps."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in events:
        if event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            entry = kernels[event["name"]]
            entry[0] += 1
            entry[1] += event["dur"]
    by_kind: dict[str, float] = defaultdict(float)
    for name, (_, total) in kernels.items():
        by_kind[kind_of(name)] += total / steps / 1e3
    busy = sum(by_kind.values())
    cpu = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "python_function")]
    span = (max(e["ts"] + e["dur"] for e in cpu) - min(e["ts"] for e in cpu)) / steps / 1e3 if cpu else 0.0
    table = sorted(((name, calls / steps, total / steps / 1e3) for name, (calls, total) in kernels.items()),
                   key=lambda row: -row[2])
    return {"busy_ms": busy, "span_ms": span, "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "kernels": table, "matmuls": matmul_ops(events, steps)}


def matmul_ops(events: list[dict], steps: int) -> dict[tuple, float]:
    """``{(op, dims, strides, dtype): calls per step}`` of the trace's matmul ops."""
    ops: dict[tuple, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "cpu_op" and event["name"] in MATMUL_OPS:
            args = event.get("args", {})
            dims = args.get("Input Dims")
            if not dims:
                continue
            strides = args.get("Input Strides") or [None] * len(dims)
            types = args.get("Input type") or ["float"] * len(dims)
            if event["name"] == SCALED:  # both operands' dtypes: "a_dtype,b_dtype"
                dtype = ",".join(DTYPES.get(t, "float32") for t in types[:2])
            else:
                dtype = DTYPES.get(types[1 if event["name"] in WITH_ADDEND else 0], "float32")
            key = (event["name"], json.dumps(dims), json.dumps(strides), dtype)
            ops[key] += 1 / steps
    return dict(ops)


def operands(op: str, dims: list) -> tuple[list, list]:
    """The two multiplied operands' dims (addmm/baddbmm carry the added tensor first)."""
    return (dims[1], dims[2]) if op in WITH_ADDEND else (dims[0], dims[1])


def flops(op: str, dims: list) -> float:
    a, b = operands(op, dims)
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def time_alone(op: str, dims: list, strides: list, dtype: str, device, repeats: int = 10) -> float:
    """Median seconds of one such matmul on its own (inputs with the trace's strides; ``dtype`` of
    both operands, or ``"a,b"`` for ``_scaled_mm``'s)."""
    import torch

    def tensor(shape, stride, dtype):
        dtype = getattr(torch, dtype)
        if stride is None or len(stride) != len(shape):
            return torch.randn(shape, device=device).to(dtype)
        size = 1 + sum((n - 1) * s for n, s in zip(shape, stride))
        return torch.randn(size, device=device).to(dtype).as_strided(shape, stride)

    (a_dims, b_dims), index = operands(op, dims), (1, 2) if op in WITH_ADDEND else (0, 1)
    a_dtype, _, b_dtype = dtype.partition(",")
    a, b = tensor(a_dims, strides[index[0]], a_dtype), tensor(b_dims, strides[index[1]], b_dtype or a_dtype)
    if op == SCALED:
        one = torch.ones((), device=device)
        run = lambda x, y: torch._scaled_mm(x, y, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    elif op == GROUPED:
        ends = _even_ends(a_dims[0] if len(b_dims) == 3 else a_dims[1], dims[2][0], device)
        run = lambda x, y: torch._grouped_mm(x, y, offs=ends)  # noqa: E731
    else:
        run = {"aten::mm": torch.mm, "aten::bmm": torch.bmm}.get(op)
    if run is None:  # addmm(_)/baddbmm: the added tensor as the trace had it
        addend = tensor(dims[0], strides[0], a_dtype)
        run = (lambda x, y: torch.baddbmm(addend, x, y)) if op == "aten::baddbmm" else (lambda x, y: torch.addmm(addend, x, y))
    return _seconds(lambda: run(a, b), device, repeats)


def _even_ends(rows: int, groups: int, device):
    """Each group's end row (int32) for ``groups`` groups of ``rows`` of about equal size, multiples of 16."""
    import torch

    ends = [min(rows, (rows * (g + 1) // groups) // 16 * 16) for g in range(groups - 1)] + [rows]
    return torch.tensor(ends, dtype=torch.int32, device=device)


def _seconds(fn, device, repeats: int) -> float:
    """benchmarks/kernels.py's device timing: calls queued back to back, as inside a step."""
    bench = train_vs_peer.sibling("kernels").Bench(device, warmup=3, reps=repeats)
    return bench.time_ms(fn, batches=repeats) / 1e3


def ceiling(matmuls: dict[tuple, float], device) -> dict:
    """FLOPs per step of the step's matmuls and the seconds they take one at a time, alone."""
    total_flops = alone_s = 0.0
    for (op, dims, strides, dtype), calls in matmuls.items():
        dims, strides = json.loads(dims), json.loads(strides)
        total_flops += calls * flops(op, dims)
        alone_s += calls * time_alone(op, dims, strides, dtype, device)
    return {"matmul_flops": total_flops, "matmul_alone_ms": alone_s * 1e3, "distinct_matmuls": len(matmuls)}


def dense_tflops(device) -> float:
    import torch

    n = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    return 2 * n**3 / _seconds(lambda: a @ b, device, 10) / 1e12


def profile_run(args) -> tuple[dict, Path]:
    """``fastllm train`` with the profiler over ``--profile`` steps; the trace and its run directory."""
    first, last = (int(x) for x in args.profile.split("-"))
    run_dir = Path(tempfile.mkdtemp(prefix="profile_train-"))
    command = train_vs_peer.train_command(args.recipe, [*args.overrides, f"log.profile_steps=[{first},{last}]"],
                                          args.data, args.steps, args.steps, run_dir)
    done = subprocess.run(command, cwd=train_vs_peer.ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
        raise SystemExit(f"profile_train: fastllm train failed (exit {done.returncode}): {tail}")
    trace = json.loads((run_dir / "profile" / f"steps-{first}-{last}.json").read_text())
    return trace, run_dir


def markdown(summary: dict, top: int) -> str:
    busy = summary["busy_ms"] or 1.0
    lines = ["| kernel | kind | calls/step | ms/step | share |", "|---|---|---:|---:|---:|"]
    for name, calls, ms in summary["kernels"][:top]:
        short = name if len(name) <= 70 else name[:67] + "..."
        lines.append(f"| `{short}` | {kind_of(name)} | {calls:g} | {ms:.2f} | {100 * ms / busy:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = train_vs_peer.recipe_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=13, help="steps in all (the first ones compile)")
    parser.add_argument("--profile", default="11-13", help="FIRST-LAST steps under the profiler (1-based)")
    parser.add_argument("--top", type=int, default=15, help="kernels in the table")
    args = parser.parse_intermixed_args(argv)
    train_vs_peer.step_range(parser, "--profile", args.profile, args.steps)
    import torch

    trace, run_dir = profile_run(args)
    first, last = (int(x) for x in args.profile.split("-"))
    summary = summarize(trace, last - first + 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    matmul_ms = summary["by_kind_ms"].get("matmul", 0.0)
    measured = ceiling(summary["matmuls"], device)
    out = {"recipe": args.recipe, "overrides": args.overrides, "device": torch.cuda.get_device_name() if device.type == "cuda"
           else "cpu", "busy_ms": round(summary["busy_ms"], 2), "span_ms": round(summary["span_ms"], 2),
           "by_kind_ms": {k: round(v, 2) for k, v in summary["by_kind_ms"].items()},
           "matmul_tflops": round(measured["matmul_flops"] / matmul_ms / 1e9, 1) if matmul_ms else None,
           "matmul_alone_ms": round(measured["matmul_alone_ms"], 2),
           "matmul_vs_alone": round(matmul_ms / measured["matmul_alone_ms"], 3) if matmul_ms else None,
           "matmul_gflop_per_step": round(measured["matmul_flops"] / 1e9, 6),
           "distinct_matmuls": measured["distinct_matmuls"], "dense_tflops": round(dense_tflops(device), 1),
           "trace": str(run_dir / "profile")}
    print(markdown(summary, args.top), flush=True)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
