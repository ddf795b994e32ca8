"""The lowering engine, ours against DTensor's: a tensor-parallel MLP (up and gate split over
``tensor``, down contracting the split; sequence parallel or not), forward and backward, timed
per call on the same ranks.

    torchrun --nproc-per-node 2 benchmarks/lowering.py            # gloo on CPU, or NCCL on GPUs
    torchrun --nproc-per-node 2 benchmarks/lowering.py --sizes 64x128x256 1024x4096x2048

Each size is ``embed x mlp x tokens``. "fastllm" runs :func:`fastllm.nn.ops.projections` and
:func:`fastllm.nn.ops.dense` under the partitioner's layout (collectives derived from the rules
table); "dtensor" the same maths on ``torch.distributed.tensor`` DTensors with the weights
sharded as Megatron does and an explicit ``redistribute`` of the input and the output (DTensor's
sharding propagation derives the partial sums of the second matmul). Both are checked against
each other before timing. Prints one JSON line per (system, size, sequence parallel) on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastllm import nn
from fastllm.sharding import COMPUTE_RULES, Mesh, MeshLayout

STREAM = ("batch", "seq", "embed")


def fastllm_mlp(layout, sp: bool, x, up, gate, down):
    up_y, gate_y = nn.ops.projections(layout, x, STREAM, [(up, ("mlp", "embed"), None), (gate, ("mlp", "embed"), None)])
    hidden = F.silu(gate_y) * up_y
    return nn.ops.dense(layout, hidden, ("batch", "seq", "mlp"), down, ("embed", "mlp"))


def dtensor_mlp(mesh, sp: bool, x, up, gate, down):
    from torch.distributed.tensor import Replicate, Shard

    x = x.redistribute(mesh, [Replicate()])  # the input every rank needs (SP: an all-gather of seq)
    hidden = F.silu(x @ gate.t()) * (x @ up.t())  # Shard(-1): each rank its mlp block
    y = hidden @ down.t()  # Partial sums over tensor
    return y.redistribute(mesh, [Shard(1) if sp else Replicate()])


def time_calls(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])  # the first calls warm caches (plans, DTensor's propagation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["64x128x256", "512x2048x1024", "1024x4096x2048"])
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    mesh = Mesh.from_env(data=1, tensor=-1, backend=backend)
    device = mesh.device
    n, rank = mesh.size("tensor"), mesh.rank("tensor")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dmesh = init_device_mesh(device.type, (n,))
    for size in args.sizes:
        embed, mlp, tokens = (int(v) for v in size.split("x"))
        gen = torch.Generator().manual_seed(0)
        full = {name: (torch.randn(shape, generator=gen) * 0.02).to(device) for name, shape in
                (("up", (mlp, embed)), ("gate", (mlp, embed)), ("down", (embed, mlp)))}
        x_full = torch.randn(1, tokens, embed, generator=gen).to(device)
        for sp in (False, True):
            layout = MeshLayout(mesh, COMPUTE_RULES.replace("seq", "tensor") if sp else COMPUTE_RULES)
            local = {k: v.chunk(n, dim=0 if k != "down" else 1)[rank].clone().requires_grad_() for k, v in full.items()}
            x_local = (x_full.chunk(n, dim=1)[rank] if sp else x_full).clone().requires_grad_()
            dt = {k: distribute_tensor(v, dmesh, [Shard(0 if k != "down" else 1)]).requires_grad_() for k, v in full.items()}
            x_dt = distribute_tensor(x_full, dmesh, [Shard(1) if sp else Replicate()]).requires_grad_()

            def ours():
                y = fastllm_mlp(layout, sp, x_local, local["up"], local["gate"], local["down"])
                y.square().sum().backward()
                return y

            def theirs():
                y = dtensor_mlp(dmesh, sp, x_dt, dt["up"], dt["gate"], dt["down"])
                y.to_local().square().sum().backward()
                return y

            diff = (ours() - theirs().to_local()).abs().max().item()
            for system, fn in (("fastllm", ours), ("dtensor", theirs)):
                seconds = time_calls(fn, args.repeats, device)
                if rank == 0:
                    print(json.dumps({"system": system, "size": size, "sequence_parallel": sp, "ranks": n,
                                      "backend": backend, "ms_per_call": round(seconds * 1e3, 3),
                                      "max_difference": diff}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("FASTLLM_TYPECHECK", "0")
    main()
