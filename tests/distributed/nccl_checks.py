"""The gloo checks again on GPUs over NCCL (the fast single-buffer collectives); not run by CI.

    torchrun --nproc_per_node=2 tests/distributed/nccl_checks.py   # or 4: adds the 2x2 mesh checks
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch.distributed as dist  # noqa: E402

import collective_checks  # noqa: E402

if __name__ == "__main__":
    world = int(os.environ["WORLD_SIZE"])
    specs = [("data", None, "tensor"), (("data", "tensor"), None), (None, ("tensor", "data")), ("tensor",)]
    report = collective_checks.world_2_checks() if world == 2 else collective_checks.world_4_checks(specs)
    failures = {name: outcome for name, outcome in report.items() if outcome != "ok"}
    print(f"rank {dist.get_rank()} backend {dist.get_backend()}: {len(report) - len(failures)}/{len(report)} ok")
    for name, outcome in failures.items():
        print(f"rank {dist.get_rank()} FAILED {name}\n{outcome}")
    dist.destroy_process_group()
    sys.exit(1 if failures else 0)
