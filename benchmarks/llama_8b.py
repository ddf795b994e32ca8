"""Training throughput of a Llama-3.1-8B-shaped model: fastllm beside an FSDP2 peer, one JSON line each.

    torchrun --nproc-per-node 4 benchmarks/llama_8b.py                   # both systems, 4 GPUs
    torchrun --nproc-per-node 4 benchmarks/llama_8b.py --layers 4 --steps 3   # a quick check
    torchrun --nproc-per-node 2 benchmarks/llama_8b.py --tiny --no-compile    # CPU + gloo smoke test
    torchrun --nproc-per-node 4 benchmarks/llama_8b.py --system fastllm --compile-blocks  # compiled blocks

Both systems train the same shapes on the same tokens (random ids; a batch per step and data
rank, identical for the two) with AdamW, bf16 compute and fp32 gradient reduction:

* **peer**: Hugging Face transformers' ``LlamaForCausalLM`` from a ``LlamaConfig`` of the preset
  (random init: built on the meta device, sharded, then materialised on each rank's GPU), torch
  FSDP2 ``fully_shard`` per decoder layer and at the root with
  ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``, each decoder layer wrapped
  in ``torch.compile`` before sharding (torchtitan's order), ``torch.optim.AdamW`` (fused on GPU),
  SDPA attention, no activation checkpointing (``--peer-ac`` turns it on);
* **fastllm**: the partitioner's sharded train step at ZeRO-3 over ``data`` = the world, gradient
  reduction overlapped with backward and parameter gathers prefetched one block ahead, moved by
  NVLink copy engines on one host (``--transport``: auto, nccl, copy_engine)
  (``--no-overlap``: synchronous; :func:`build_fastllm_step`, the one place to adapt as the
  partitioner evolves); ``--compile-blocks`` compiles each decoder block as the peer does.

A step is forward, backward, gradient reduction and the optimizer update of ``--micro-batch``
sequences of ``--seq-len`` tokens per GPU. Reported per system: the median step time over
``--steps`` measured steps after ``--warmup`` (each step timed on every rank, the slowest rank
counts; with ``--sync-every K`` the host waits for the GPU only every K steps, as a training loop
that logs every K steps does, and a step's time is its group's time / K), tokens/s/GPU, MFU = tokens/s/GPU x FLOPs/token / 989e12 with FLOPs/token from
``fastllm.models.flops_per_token`` (DESIGN.md), the peak GPU memory (max over ranks) and the losses.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

PEAK_FLOPS = 989e12  # H100/H200 dense bf16 (DESIGN.md)
StepFn = Callable[[dict], torch.Tensor]  # one training step on this rank's batch -> its loss


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", choices=("peer", "fastllm", "both"), default="both")
    parser.add_argument("--preset", default="llama3.1-8b", help="fastllm.models preset (default llama3.1-8b)")
    parser.add_argument("--tiny", action="store_true", help="tiny-llama shapes (CPU smoke test)")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--seq-len", type=int, default=None, help="default 4096 (128 with --tiny)")
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per GPU per step")
    parser.add_argument("--steps", type=int, default=8, help="measured steps")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (compilation)")
    parser.add_argument("--sync-every", type=int, default=1, metavar="K",
                        help="wait for the GPU every K steps only (default 1: every step is synchronised and "
                             "its host work shows); --steps must be a multiple of K")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="peer without torch.compile")
    parser.add_argument("--peer-ac", action="store_true", help="activation checkpointing per peer layer")
    parser.add_argument("--peer-loss", choices=("ce", "flce"), default="ce",
                        help="the peer's loss: logits then cross-entropy, or Liger's fused linear cross-entropy")
    parser.add_argument("--zero-stage", type=int, default=3, help="fastllm ZeRO stage (default 3)")
    parser.add_argument("--no-overlap", dest="overlap", action="store_false",
                        help="fastllm with synchronous collectives (default: reduction overlapped with "
                             "backward, ZeRO-3 gathers prefetched one block ahead)")
    parser.add_argument("--transport", choices=("auto", "nccl", "copy_engine"), default="auto",
                        help="fastllm ZeRO-3 transport (default auto: NVLink copy engines on one host, else NCCL)")
    parser.add_argument("--bucket-mib", type=int, default=64, help="fastllm gradient bucket size (MiB)")
    parser.add_argument("--remat", action="store_true", help="fastllm recomputes each block in backward")
    parser.add_argument("--compile-blocks", action="store_true",
                        help="fastllm compiles each decoder block (torch.compile, inductor; norms, rotary and "
                             "activation as torch ops inside; fastllm/train/compile.py); needs FASTLLM_TYPECHECK=0")
    parser.add_argument("--sdpa", choices=("default", "cudnn", "flash"), default="default",
                        help="SDPA backend preferred for both systems' attention (default: PyTorch's choice)")
    parser.add_argument("--tag", default="", help="suffix of the profile's file names")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after measuring, profile one more step: each rank writes its Chrome trace "
                             "(rank 0: DIR/<system>.json.gz, rank r: DIR/<system>.rank<r>.json.gz), rank 0 "
                             "DIR/<system>.txt (kernels by device time)")
    args = parser.parse_args(argv)
    if args.sync_every < 1 or args.steps % args.sync_every:
        parser.error(f"--steps ({args.steps}) must be a positive multiple of --sync-every ({args.sync_every})")
    if args.seq_len is None:
        args.seq_len = 128 if args.tiny else 4096
    return args


def model_config(args):
    from fastllm import models

    config = models.preset("tiny-llama" if args.tiny else args.preset)
    if args.layers is not None:
        config = config.replace(n_layers=args.layers)
    if config.max_seq_len < args.seq_len:
        config = config.replace(max_seq_len=args.seq_len)
    return config


def setup() -> torch.device:
    """Process group from torchrun's variables (NCCL on GPUs, gloo on CPU); this rank's device."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=5))
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def batch_for(step: int, args, vocab_size: int, device: torch.device) -> dict:
    """This data rank's rows for ``step``: the same for both systems."""
    gen = torch.Generator().manual_seed(1_000_003 * step + dist.get_rank())
    ids = torch.randint(0, vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen)
    return {"tokens": ids[:, :-1].contiguous().to(device), "targets": ids[:, 1:].contiguous().to(device)}


# --- the peer: transformers Llama + FSDP2 ---------------------------------------------------------
def build_peer_step(args, config, device: torch.device) -> StepFn:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastllm.hf.families import by_family

    fields = by_family(config.family).mapping.config_to_hf(config)
    hf_config = LlamaConfig(**fields, use_cache=False, attn_implementation="sdpa")
    fused_loss = args.peer_loss == "flce"
    if fused_loss:  # Liger patches LlamaForCausalLM's forward (for the whole process): the loss from
        # hidden states, no logits; called without labels (a "ce" peer after it) it still gives logits
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=False, rms_norm=False, swiglu=False, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if args.peer_ac:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            layer = checkpoint_wrapper(layer)
        if args.compile:
            layer = torch.compile(layer)
        layers[i] = layer
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.to_empty(device=device)
    torch.manual_seed(0)  # same seed on every rank: DTensor's random ops need it
    _init_peer(model, hf_config, config.init_std, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1,
                                  fused=device.type == "cuda")

    def step(batch: dict) -> torch.Tensor:
        if fused_loss:
            loss = model(input_ids=batch["tokens"], shift_labels=batch["targets"]).loss
        else:
            logits = model(input_ids=batch["tokens"]).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


@torch.no_grad()
def _init_peer(model, hf_config, std: float, device: torch.device) -> None:
    """Random weights on the (sharded) parameters; the rotary buffers recomputed (``to_empty``
    leaves buffers uninitialised)."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=hf_config).to(device)


# --- ours: the partitioner's sharded train step ---------------------------------------------------
def build_fastllm_step(args, config, device: torch.device) -> StepFn:
    """fastllm at ZeRO-``args.zero_stage`` over ``data`` = the world, bf16 compute, fp32 reduce.

    Parameters are materialised from the meta device with random normals on the GPU (an exact
    sharded init draws on the CPU, which costs minutes at 8B and does not change the speed).
    """
    from fastllm import models, optim, random, tree
    from fastllm.sharding import Mesh, Partitioner
    from fastllm.train.state import TrainState
    from fastllm.train.step import TrainStep

    mesh = Mesh(data=dist.get_world_size())
    partitioner = Partitioner(mesh, zero_stage=args.zero_stage, reduce_dtype=torch.float32,
                              overlap=args.overlap, bucket_bytes=args.bucket_mib << 20, transport=args.transport)
    model = models.model(config)
    opt = optim.adamw(args.lr, weight_decay=0.1)
    train_step = TrainStep(model, partitioner, opt, precision="bf16", remat=args.remat, compile=args.compile_blocks)
    if args.zero_stage in (0, 3):  # the params are the blocks the optimizer owns
        meta = partitioner.init_params(model, random.key(0), device="meta")
        torch.manual_seed(1 + dist.get_rank())  # shards differ; their values do not matter for speed
        params = tree.map_with_path(lambda path, t: _random_like(path, t, config.init_std, device), meta)
        state = TrainState(params, opt.init(params), 0, random.key(0), None)
    else:  # stages 1-2 own storage slices only: the step builds them
        state = train_step.init_state(random.key(0))
    holder = {"state": state}

    def step(batch: dict) -> torch.Tensor:
        holder["state"], metrics = train_step(holder["state"], batch)
        return metrics["loss"].detach()

    return step


def _random_like(path: str, meta: torch.Tensor, std: float, device: torch.device) -> torch.Tensor:
    value = torch.empty(meta.shape, dtype=torch.float32, device=device)
    return value.fill_(1.0) if path.endswith(("norm.scale", "final_norm.scale")) else value.normal_(0.0, std)


# --- measuring --------------------------------------------------------------------------------
def measure(name: str, build: Callable[[], StepFn], args, config, device: torch.device, *,
            batch: Callable[[int], dict] | None = None, ranks_per_batch: int = 1) -> dict:
    """``batch(step)``: this rank's rows (default :func:`batch_for`, one batch per rank);
    ``ranks_per_batch``: ranks that share one batch (tensor parallelism), for tokens per GPU."""
    batch = batch or (lambda i: batch_for(i, args, config.vocab_size, device))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    step = build()
    log(f"{name}: built in {time.perf_counter() - started:.1f} s")
    times, losses = [], []
    groups = [[i] for i in range(args.warmup)]  # steps timed together: one sync before and after
    groups += [list(range(start, start + args.sync_every))
               for start in range(args.warmup, args.warmup + args.steps, args.sync_every)]
    for group in groups:
        batches = [batch(i) for i in group]
        _sync(device)
        begin = time.perf_counter()
        group_losses = [step(batch) for batch in batches]
        _sync(device)
        elapsed = (time.perf_counter() - begin) / len(group)
        losses += [float(loss) for loss in group_losses]
        if group[0] >= args.warmup:
            times += [elapsed] * len(group)
        last = group[-1] + 1
        log(f"{name}: step {last}/{args.warmup + args.steps} {'warmup' if last <= args.warmup else ''} "
            f"{elapsed:.3f} s{' each' if len(group) > 1 else ''} loss {losses[-1]:.4f}")
    if args.profile:
        profile_step(name, step, batch(args.warmup + args.steps), args, device)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    step_time = statistics.median(slowest.tolist())
    tokens_per_gpu = args.micro_batch * args.seq_len / step_time / ranks_per_batch
    return {"system": name, "step_time_s": round(step_time, 4), "tokens_per_s_per_gpu": round(tokens_per_gpu, 1),
            "mfu": round(tokens_per_gpu * flops_per_token(config, args) / PEAK_FLOPS, 4),
            "peak_memory_gib": _peak_memory_gib(device), "losses": [round(x, 4) for x in losses]}


def profile_step(name: str, step: StepFn, batch: dict, args, device: torch.device) -> None:
    """One step under torch.profiler: every rank writes its trace (``<tag>.json.gz`` on rank 0,
    ``<tag>.rank<r>.json.gz`` elsewhere: the slowest rank sets the step time), rank 0 a summary."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step(batch)
        _sync(device)
    os.makedirs(args.profile, exist_ok=True)
    tag = f"{name}-{args.tag}" if args.tag else name
    rank = dist.get_rank()
    trace = os.path.join(args.profile, f"{tag}.json" if rank == 0 else f"{tag}.rank{rank}.json")
    prof.export_chrome_trace(trace)
    import gzip
    import shutil

    with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(trace)
    if rank != 0:
        return
    sort = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    with open(os.path.join(args.profile, f"{tag}.txt"), "w") as out:
        out.write(prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=90))


def flops_per_token(config, args) -> float:
    from fastllm import models

    return models.flops_per_token(config, args.seq_len)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    peak = torch.tensor(float(torch.cuda.max_memory_allocated(device)), device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return round(peak.item() / 2**30, 2)


def sdpa_preference(choice: str):
    """A context preferring one SDPA backend (the others stay allowed, after it)."""
    import contextlib

    if choice == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[choice]
    rest = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel([first] + [b for b in rest if b != first], set_priority=True)


def log(message: str) -> None:
    if dist.get_rank() == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def common_fields(args, config, device: torch.device) -> dict:
    import transformers

    return {"preset": "tiny-llama" if args.tiny else args.preset, "layers": config.n_layers,
            "seq_len": args.seq_len, "micro_batch": args.micro_batch, "world_size": dist.get_world_size(),
            "steps": args.steps, "warmup": args.warmup, "sync_every": args.sync_every, "flops_per_token": flops_per_token(config, args),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = setup()
    config = model_config(args)
    builders = {
        "peer": lambda: build_peer_step(args, config, device),
        "fastllm": lambda: build_fastllm_step(args, config, device),
    }
    systems = ["peer", "fastllm"] if args.system == "both" else [args.system]
    failed = False
    for name in systems:
        fields = {**common_fields(args, config, device), "system": name}
        if name == "peer":
            fields.update(compile=args.compile, activation_checkpointing=args.peer_ac, loss=args.peer_loss)
        else:
            fields.update(zero_stage=args.zero_stage, overlap=args.overlap, transport=args.transport, bucket_mib=args.bucket_mib,
                          remat=args.remat, compile_blocks=args.compile_blocks)
        fields["sdpa"] = args.sdpa

        def run(name=name) -> dict:
            with sdpa_preference(args.sdpa):
                return measure(name, builders[name], args, config, device)

        failed |= not report(fields, run, device)
    dist.destroy_process_group()
    return 1 if failed else 0


def report(fields: dict, run: Callable[[], dict], device: torch.device, *, every_rank_traceback: bool = False) -> bool:
    """``fields`` plus what ``run()`` measured (or its error) as one JSON line from rank 0, then the
    memory freed for the next system; False when it failed."""
    ok = True
    try:
        fields.update(run())
    except Exception as error:  # noqa: BLE001 - report and go on with the other system
        ok = False
        fields["error"] = f"{type(error).__name__}: {error}"
        if every_rank_traceback or dist.get_rank() == 0:
            traceback.print_exc()
    if dist.get_rank() == 0:
        print(json.dumps(fields), flush=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ok


if __name__ == "__main__":
    sys.exit(main())
