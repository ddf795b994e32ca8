"""The partitioner equivalence checks again on GPUs over NCCL; not run by CI (not a test_ file).

Every layout trains like one process (partitioner_checks.py): each rank computes the single-process
reference on its own GPU (the same kernels and rounding as its sharded run, float32 matmuls in full
fp32, no TF32), then checks the sharded init bitwise, the gradients after step 1, and after 5 steps
the losses, grad norms, final params and optimizer moments within 1e-5 relative, for tiny-llama and
tiny-qwen2, grad accumulation 1 and 2::

    torchrun --nproc-per-node 4 tests/distributed/nccl_partitioner.py   # every layout of LAYOUTS
    torchrun --nproc-per-node 2 tests/distributed/nccl_partitioner.py   # their 2-rank versions
    torchrun --nproc-per-node 4 tests/distributed/nccl_partitioner.py --device cpu   # gloo, no GPU

With 2 ranks the layouts are those of LAYOUTS halved: data=4 becomes data=2 (ZeRO 1/2/3, remat,
sync), tensor=4 becomes tensor=2 (with and without sequence parallelism); the data=2 x tensor=2
layouts need 4 ranks and are left out. Exit code 1 when any check fails on this rank.
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(os.path.dirname(HERE)))  # the repo root, for ``fastllm``

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import partitioner_checks  # noqa: E402
from fastllm.sharding import Mesh  # noqa: E402

PRESETS = ("tiny-llama", "tiny-qwen2")


def halve(name: str, sizes: dict) -> tuple[str, dict] | None:
    """The 2-rank version of a 4-rank layout (a single axis of 4 becomes 2), or None."""
    if sorted(sizes.values()) != [4]:
        return None
    (axis,) = sizes
    return name.replace(f"{axis}4", f"{axis}2"), {axis: 2}


def layouts_for(world: int) -> list:
    if world == 4:
        return partitioner_checks.LAYOUTS
    if world == 2:
        halved = [(halve(name, sizes), stage, rules, options) for name, sizes, stage, rules, options in
                  partitioner_checks.LAYOUTS]
        return [(*named, stage, rules, options) for named, stage, rules, options in halved if named is not None]
    raise SystemExit(f"nccl_partitioner.py runs on 2 or 4 ranks, got WORLD_SIZE={world}")


def with_nccl_transport(layouts: list) -> list:
    """Each overlapped ZeRO-3 layout again with ``transport="nccl"`` (the default picks the copy
    engines on one host): both transports are checked against one process."""
    again = [(f"{name}_nccl", sizes, stage, rules, {**options, "transport": "nccl"})
             for name, sizes, stage, rules, options in layouts if stage == 3 and options.get("overlap", True)]
    return layouts + again


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: NCCL, one GPU per LOCAL_RANK; cpu: gloo (checks the script without GPUs)")
    args = parser.parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but CUDA is not available (use --device cpu for gloo)")
        # Exact fp32 matmuls, as on CPU: TF32 would round differently in the reference and the shards.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    else:
        torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layouts = layouts_for(world)
    if args.device == "cuda":
        layouts = with_nccl_transport(layouts)
    mesh = Mesh.from_env(backend="nccl" if args.device == "cuda" else "gloo")  # cuda:LOCAL_RANK under NCCL
    start = time.perf_counter()
    report = {}
    for preset in PRESETS:
        report.update(partitioner_checks.layout_checks(preset, (1, 2), device=mesh.device, layouts=layouts))
    seconds = time.perf_counter() - start
    failures = {name: outcome for name, outcome in report.items() if outcome != "ok"}
    rank = dist.get_rank()
    print(f"rank {rank} backend {dist.get_backend()} world {world}: {len(report) - len(failures)}/{len(report)} ok",
          flush=True)
    print(f"rank {rank} on {mesh.device}: {len(layouts)} layouts x 2 accumulations x {len(PRESETS)} presets "
          f"in {seconds:.1f} s", flush=True)
    for name, outcome in failures.items():
        print(f"rank {rank} FAILED {name}\n{outcome}", flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
