"""Checks run inside spawned gloo ranks: every layout trains like one process.

For each model and layout, every rank computes the single-process reference itself (tiny models:
cheap), then runs the sharded step on its shards and compares: the sharded init against the slice
of the unsharded init (bitwise), the gradients after step 1 (gathered to global tensors) and the
losses of 5 AdamW steps (within 1e-5 relative), and the bytes it holds against ``describe``.
Returns ``{check name: "ok" | traceback}`` so one spawn reports every failure at once.

``device`` (default CPU, for the gloo ranks) is where the reference, the batches and the comparisons
live; it must be the mesh's device (``cuda:LOCAL_RANK`` under NCCL, see nccl_partitioner.py), so the
reference and the sharded run see the same kernels and rounding.
"""

from __future__ import annotations

import traceback

import torch
import torch.distributed as dist

from fastllm import models, optim, random, tree
from fastllm.sharding import Mesh, Partitioner, shard, unshard
from fastllm.sharding.spec import is_spec
from fastllm.train.sharded_step import init_sharded_state, make_sharded_train_step
from fastllm.train.state import TrainState
from fastllm.train.step import _gradients, make_train_step, split_micro_batches

STEPS, BATCH, SEQ, LR, CLIP = 5, 8, 16, 3e-3, 0.5
RTOL = 1e-5
BUCKET_BYTES = 64 << 10  # several gradient buckets per tiny model (~400 KiB of fp32 params)


def batches(config, seed: int = 0, device: torch.device | str = "cpu") -> list[dict]:
    """STEPS global batches with some ignored targets (uneven valid tokens per rank) and packed
    documents (segment ids); drawn on CPU (the same on every device), then moved to ``device``."""
    out = []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(seed * 100 + step)
        tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ + 1), generator=gen)
        targets = tokens[:, 1:].clone()
        targets[torch.rand(targets.shape, generator=gen) < 0.2] = -100
        boundary = torch.randint(1, SEQ, (BATCH, 1), generator=gen)  # two packed documents a row
        segment_ids = (torch.arange(SEQ)[None, :] >= boundary).long()
        batch = {"tokens": tokens[:, :-1].contiguous(), "targets": targets, "segment_ids": segment_ids}
        out.append({name: value.to(device) for name, value in batch.items()})
    return out


def reference(config, key, device: torch.device | str = "cpu") -> dict:
    """One process on ``device``: params at init, gradients of step 1 and the losses of every step."""
    opt = optim.adamw(LR, weight_decay=0.1, max_grad_norm=CLIP)
    params = models.init(config, random.fold_in(key, "params"), device=device)
    data = batches(config, device=device)
    grads, _ = _gradients(lambda p, b: models.loss(config, p, b), params, [data[0]], torch.float32, None)
    step = make_train_step(config, opt)
    state = TrainState(tree.map(torch.clone, params), opt.init(params), 0, key)  # `params` stay the init
    losses = []
    for batch in data:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return {"params": params, "grads": grads, "losses": losses, "data": data}


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    if not error <= RTOL * max(scale, 1e-30):
        raise AssertionError(f"{what}: max error {error:.3g} vs max magnitude {scale:.3g}")


def local_rows(batch: dict, mesh: Mesh) -> dict:
    n, me = mesh.size("data"), mesh.rank("data")
    return {name: value.chunk(n)[me] for name, value in batch.items()}


def nbytes(values) -> int:
    return sum(t.numel() * t.element_size() for t in tree.leaves(values) if t.ndim > 0)


def check_overlap(step, config, mesh: Mesh, zero_stage: int, remat: bool, transport: str = "auto") -> None:
    """The overlap path really overlapped: some buckets started during backward, and ZeRO-3
    gathers were prefetched (forward and, under remat, backward) with one in flight at most."""
    stats = step.overlap_stats
    if mesh.size("data") > 1 and stats["started_in_backward"] != stats["buckets"]:
        raise AssertionError(f"every gradient bucket should start during backward: {stats}")
    if mesh.size("data") > 1 and zero_stage < 3 and stats["buckets"] < 3:
        raise AssertionError(f"expected several gradient buckets of {BUCKET_BYTES} bytes: {stats}")
    if zero_stage == 3 and mesh.size("data") > 1:
        blocks = config.n_layers * (2 if remat else 1)
        if stats["prefetched"] < blocks or stats["most_in_flight"] != 1:
            raise AssertionError(f"ZeRO-3 prefetch: expected >= {blocks} prefetched gathers, one in flight "
                                 f"at most: {stats}")
        if not config.tie_embeddings and stats["companions"] < 1:  # the final norm brings the LM head
            raise AssertionError(f"ZeRO-3 prefetch: the LM head should be gathered with the final norm: {stats}")
        if not config.tie_embeddings and mesh.size("tensor") == 1 and stats["lookups"] < 1:
            raise AssertionError(f"ZeRO-3: tokens should be looked up from the table's storage block: {stats}")
        copy_engines = transport == "copy_engine" or (transport == "auto" and mesh.backend == "nccl")
        if copy_engines != (stats["copy_engine_gathers"] >= config.n_layers):
            raise AssertionError(f"ZeRO-3 transport {transport!r} on {mesh.backend}: copy-engine gathers "
                                 f"expected {'for every block' if copy_engines else 'none'}: {stats}")


def check_layout(config, ref: dict, key, mesh: Mesh, zero_stage: int, sp: bool, grad_accum: int,
                 overlap: bool = True, remat: bool = False, transport: str = "auto") -> None:
    partitioner = Partitioner(mesh, zero_stage=zero_stage, sequence_parallel=sp, overlap=overlap,
                              bucket_bytes=BUCKET_BYTES, transport=transport)
    plan = partitioner.plan(models.param_specs(config))
    opt = optim.adamw(LR, weight_decay=0.1)  # clipping lives in the sharded step
    state = init_sharded_state(config, partitioner, opt, key)
    flat_specs = tree.flatten(plan.params, is_leaf=is_spec)
    for path, value in tree.flatten(state.params).items():
        expected = shard(tree.flatten(ref["params"])[path], flat_specs[path], mesh)
        if not torch.equal(value, expected):
            raise AssertionError(f"sharded init of {path} differs from the slice of the full init")
    step = make_sharded_train_step(config, partitioner, opt, grad_accum=grad_accum, max_grad_norm=CLIP, remat=remat)
    grads, _, _ = step.gradients(state, local_rows(ref["data"][0], mesh))
    if overlap:
        check_overlap(step, config, mesh, zero_stage, remat, transport)
    grad_specs = tree.flatten(plan.grads, is_leaf=is_spec)
    for path, g in tree.flatten(grads).items():
        close(unshard(g, grad_specs[path], mesh), tree.flatten(ref["grads"])[path], f"gradient of {path}")
    totals = partitioner.describe(plan.declarations).totals
    held = {"params": nbytes(state.params), "grads": nbytes(grads), "optimizer": nbytes(state.opt_state)}
    for name, value in held.items():
        if value != totals[name]:
            raise AssertionError(f"describe says {totals[name]} bytes of {name} per rank, rank holds {value}")
    losses = []
    for batch in ref["data"]:
        state, metrics = step(state, local_rows(batch, mesh))
        losses.append(float(metrics["loss"]))
    for i, (a, b) in enumerate(zip(losses, ref["losses"])):
        if not abs(a - b) <= RTOL * abs(b):
            raise AssertionError(f"loss of step {i + 1}: {a!r} vs one process {b!r} (all: {losses} vs {ref['losses']})")


# (name, mesh sizes, zero stage, sequence parallel, options): communication overlapped with
# compute by default (fastllm/sharding/overlap.py); "sync" layouts run every collective in place
# (overlap=False), "remat" ones recompute blocks (ZeRO-3 re-gathers them in backward, prefetched).
LAYOUTS = [
    ("data4_zero1", dict(data=4), 1, False, {}),
    ("data4_zero2", dict(data=4), 2, False, {}),
    ("data4_zero3", dict(data=4), 3, False, {}),
    ("data4_zero3_remat", dict(data=4), 3, False, dict(remat=True)),
    ("tensor4", dict(tensor=4), 0, False, {}),
    ("tensor4_sp", dict(tensor=4), 0, True, {}),
    ("data2_tensor2_zero3", dict(data=2, tensor=2), 3, False, {}),
    ("data2_tensor2_zero3_sp", dict(data=2, tensor=2), 3, True, {}),
    ("data2_tensor2_zero3_sp_remat", dict(data=2, tensor=2), 3, True, dict(remat=True)),
    ("data4_zero2_sync", dict(data=4), 2, False, dict(overlap=False)),
    ("data4_zero3_sync", dict(data=4), 3, False, dict(overlap=False)),
    ("data2_tensor2_zero3_sp_sync", dict(data=2, tensor=2), 3, True, dict(overlap=False)),
]


def layout_checks(preset: str, grad_accums: tuple[int, ...] = (1, 2), device: torch.device | str = "cpu",
                  layouts: list | None = None) -> dict[str, str]:
    """Every layout of ``layouts`` (default LAYOUTS) for one tiny preset; tensor=4 needs 4 KV heads
    (the tiny presets have 2), so those layouts use the preset with ``n_kv_heads=4``. The reference
    of each config is computed once, on ``device``, when a layout first needs it."""
    key, device = random.key(7), torch.device(device)
    configs = {2: models.preset(preset), 4: models.preset(preset, n_kv_heads=4)}
    refs = {}
    report = {}
    for name, sizes, stage, sp, options in LAYOUTS if layouts is None else layouts:
        mesh = Mesh(**{"data": 1, "tensor": 1, **sizes})
        if mesh.device != device:
            raise ValueError(f"layout {name}: the mesh computes on {mesh.device} but the reference was "
                             f"asked for on {device}; pass device=mesh.device")
        tp = 4 if mesh.size("tensor") == 4 else 2
        if tp not in refs:
            refs[tp] = reference(configs[tp], key, device)
        for accum in grad_accums:
            check = f"{preset}/{name}/accum{accum}"
            try:
                check_layout(configs[tp], refs[tp], key, mesh, stage, sp, accum, **options)
                report[check] = "ok"
            except Exception:  # noqa: BLE001 - reported per check
                report[check] = traceback.format_exc()
    return report


def all_checks() -> dict[str, str]:
    return {**layout_checks("tiny-llama"), **layout_checks("tiny-qwen2")}



def transport_checks() -> dict[str, str]:
    """On gloo: ``transport="copy_engine"`` refuses with the reason; ``"auto"`` keeps NCCL-style
    collectives (checked by every layout above through ``check_overlap``)."""
    mesh = Mesh(data=dist.get_world_size())
    config = models.preset("tiny-llama")
    partitioner = Partitioner(mesh, zero_stage=3, transport="copy_engine")
    opt = optim.adamw(LR)
    state = init_sharded_state(config, partitioner, opt, random.key(0))
    step = make_sharded_train_step(config, partitioner, opt)
    batch = local_rows(batches(config)[0], mesh)
    try:
        step(state, batch)
    except RuntimeError as error:
        message = str(error)
        if "copy_engine" in message and "CUDA and NCCL" in message:
            return {"copy_engine on gloo": "ok"}
        return {"copy_engine on gloo": f"unclear error: {message}"}
    return {"copy_engine on gloo": "no error"}
