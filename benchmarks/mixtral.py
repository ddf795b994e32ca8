"""Training throughput of Mixtral-8x7B's shape cut to 2 layers (seq 4096): fastllm's Trainer on the
Mixtral recipe, its experts spread over ranks, beside a transformers-Mixtral peer; one JSON line each.

    torchrun --nproc-per-node 8 benchmarks/mixtral.py                     # both; fastllm experts over data=8
    torchrun --nproc-per-node 8 benchmarks/mixtral.py --tensor 2          # fastllm data=4 x tensor=2
    torchrun --nproc-per-node 2 benchmarks/mixtral.py --tiny --no-compile --steps 2 --warmup 1   # CPU smoke test

* **fastllm**: ``recipes/mixtral_8x7b.py`` as ``fastllm train`` loads it (its rules: experts over
  ``data``, heads and each expert's hidden units over ``tensor``; ZeRO-3 for the rest; bf16;
  recomputation unless ``--no-remat``), with ``model.n_layers``, ``data.seq_len``, the mesh and a
  micro-batch of ``--micro-batch`` sequences per data rank as overrides. The Trainer builds the mesh,
  partitioner and train step from that config (the step ``fastllm train`` runs; the loop around it
  here feeds the peer's tokens and skips the run's final checkpoint, ~37 GB at this size).
  Parameters are random normals drawn on the GPU (an exact init draws on the CPU: minutes here).
  ``--compile-blocks`` compiles each decoder block.
* **peer**: transformers' ``MixtralForCausalLM`` of the same config (its experts one grouped
  matmul, ``experts_implementation="grouped_mm"``, or with ``--peer-experts eager`` its loop over
  the experts present; every expert on every rank), each decoder layer ``torch.compile``d and then
  FSDP2-sharded over the world (torchtitan's order) with bf16 compute and fp32 reduction, SDPA
  attention, ``torch.optim.AdamW`` (fused on GPU), its router load-balancing loss
  (``output_router_logits``) added with the recipe's coefficient as fastllm adds its own.

The timing, MFU (active parameters: top-2 of 8 experts; ``fastllm.models.flops_per_token``) and
memory columns are benchmarks/llama_8b.py's. Tokens are random ids, the same rows for both systems
per data rank (fastllm's tensor ranks share theirs: tokens/s/GPU divides by the tensor size).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
# benchmarks/kernels.py would shadow the `kernels` package transformers' Mixtral imports: this folder
# leaves the import path, and llama_8b.py (the timing loop, setup and reporting) is loaded by its path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE]
_spec = importlib.util.spec_from_file_location("llama_8b", HERE / "llama_8b.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

RECIPE = HERE.parent / "recipes" / "mixtral_8x7b.py"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", choices=("peer", "fastllm", "both"), default="both")
    parser.add_argument("--tiny", action="store_true", help="tiny-mixtral shapes (CPU smoke test)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=None, help="default 4096 (128 with --tiny)")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per data rank per step")
    parser.add_argument("--tensor", type=int, default=1, help="fastllm's tensor ranks (data = world / tensor)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sync-every", type=int, default=1, metavar="K")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="peer without torch.compile")
    parser.add_argument("--peer-experts", choices=("grouped_mm", "eager"), default="grouped_mm",
                        help="the peer's expert forward: transformers' grouped matmul, or its loop over experts")
    parser.add_argument("--no-remat", dest="remat", action="store_false", help="fastllm without recomputation")
    parser.add_argument("--compile-blocks", action="store_true", help="fastllm compiles each decoder block")
    parser.add_argument("--profile", default=None, metavar="DIR")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    if args.steps % args.sync_every:
        parser.error(f"--steps ({args.steps}) must be a multiple of --sync-every ({args.sync_every})")
    args.seq_len = args.seq_len or (128 if args.tiny else 4096)
    args.sdpa = "default"
    return args


def recipe_config(args):
    """The Mixtral recipe's config with this benchmark's shape and mesh (as ``fastllm train`` would load it)."""
    from fastllm.config import load_recipe

    world = dist.get_world_size()
    data = world // args.tensor
    overrides = [f"model.n_layers={args.layers}", f"data.seq_len={args.seq_len}", f"mesh.data={data}",
                 f"mesh.tensor={args.tensor}", f"train.micro_batch_size={args.micro_batch}",
                 f"train.batch_size={args.micro_batch * data}", f"train.remat={'block' if args.remat else 'none'}",
                 f"train.compile={args.compile_blocks}", f"optim.lr={args.lr}", "optim.warmup_steps=0",
                 "run.dir=/tmp/fastllm-mixtral-benchmark"]
    if args.tiny:
        overrides += ["model.preset=tiny-mixtral"]
    if args.seq_len > 4096:
        overrides += [f"model.max_seq_len={args.seq_len}"]
    return load_recipe(RECIPE, overrides)[1]


def rows_for(step: int, data_rank: int, args, vocab_size: int, device: torch.device) -> dict:
    """Data rank ``data_rank``'s rows for ``step``: the same for both systems."""
    gen = torch.Generator().manual_seed(1_000_003 * step + data_rank)
    ids = torch.randint(0, vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen)
    return {"tokens": ids[:, :-1].contiguous().to(device), "targets": ids[:, 1:].contiguous().to(device)}


# --- fastllm: the Trainer's step on the recipe ----------------------------------------------------
def build_fastllm(config, device: torch.device):
    from fastllm import random, tree
    from fastllm.train.state import TrainState
    from fastllm.train.trainer import Trainer

    trainer = Trainer(config, train_data=iter(()))  # the benchmark feeds the batches
    step_fn, model = trainer.train_step, trainer.model
    if config.zero.stage in (0, 3):  # the params are the blocks the optimizer owns: draw them on the GPU
        meta = trainer.partitioner.init_params(model, random.key(0), device="meta")
        # one seed per data rank: the tensor ranks' replicas (the routers above all) must agree, or
        # their routing, and so their expert-parallel partial sums, would not
        torch.manual_seed(1 + trainer.mesh.rank("data"))
        params = tree.map_with_path(
            lambda path, t: common._random_like(path, t, config.model_config.init_std, device), meta)
        state = TrainState(params, trainer.optimizer.init(params), 0, random.key(0), None)
    else:
        state = trainer.init_state()
    holder = {"state": state}

    def step(batch: dict) -> torch.Tensor:
        holder["state"], metrics = step_fn(holder["state"], batch)
        return metrics["loss"].detach()

    return step, trainer.mesh.rank("data")


# --- the peer: transformers Mixtral + FSDP2 -------------------------------------------------------
def build_peer(args, config, device: torch.device):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import MixtralConfig, MixtralForCausalLM

    from fastllm.hf.families import by_family

    model_config = config.model_config
    fields = by_family("mixtral").mapping.config_to_hf(model_config)
    hf_config = MixtralConfig(**fields, use_cache=False, attn_implementation="sdpa",
                              experts_implementation=args.peer_experts)
    with torch.device("meta"):
        model = MixtralForCausalLM(hf_config)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = torch.compile(layer) if args.compile else layer
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.to_empty(device=device)
    torch.manual_seed(0)  # the same on every rank: DTensor's random ops need it
    common._init_peer(model, hf_config, model_config.init_std, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    coef = model_config.moe.aux_loss_coef

    def step(batch: dict) -> torch.Tensor:
        out = model(input_ids=batch["tokens"], output_router_logits=True)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), batch["targets"].flatten()) + coef * out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, dist.get_rank()


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.setup()
    config = recipe_config(args)
    model_config = config.model_config
    systems = ["peer", "fastllm"] if args.system == "both" else [args.system]
    failed = False
    for name in systems:
        fields = {**common.common_fields(args, model_config, device), "preset": "tiny-mixtral" if args.tiny else
                  "mixtral-8x7b", "system": name}
        fields.update(compile=args.compile, experts=args.peer_experts) if name == "peer" else fields.update(
            mesh={"data": config.mesh.data, "tensor": config.mesh.tensor}, experts=config.mesh.rules["experts"],
            zero_stage=config.zero.stage, remat=args.remat, compile_blocks=args.compile_blocks)
        built = {}

        def build(name=name):
            step, built["data_rank"] = build_fastllm(config, device) if name == "fastllm" else build_peer(
                args, config, device)
            return step

        def run(name=name, build=build) -> dict:
            return common.measure(
                name, build, args, model_config, device, ranks_per_batch=config.mesh.tensor if name == "fastllm" else 1,
                batch=lambda i: rows_for(i, built["data_rank"], args, model_config.vocab_size, device))

        # every rank's traceback: the first to fail is the one to read
        failed |= not common.report(fields, run, device, every_rank_traceback=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
