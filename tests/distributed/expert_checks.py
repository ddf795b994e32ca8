"""Checks run inside spawned gloo ranks: a mixture of experts trains like one process on every
expert layout (experts over ``data`` or ``tensor``, expert tensor parallelism, ZeRO, accumulation).

Tiny Mixtral (4 experts, top-2) with its load-balancing and z-losses weighted up (0.1 and 0.01), so
a router statistic taken over one rank's tokens instead of the global batch moves the loss far
beyond 1e-5. Per layout, as in partitioner_checks.py: the step-1 gradients, and after 5 steps the
losses, grad norms, final params and every optimizer moment within 1e-5 relative of one process in
plain PyTorch, and the bytes each rank holds against ``describe``; and the auxiliary losses of a
forward at init and at the end against one process.

The reference accumulates the layout's micro-batches: micro-batch ``i`` is every data rank's
``i``-th block of rows, weighted by its share of the valid targets, as the step weights it. The
router statistics are over every token of a micro-batch on all ranks: exact global-batch
statistics under accumulation would need every micro-batch's forward before the first backward.

``skewed`` routing: every token shares one large direction and every router leans to experts 0
and 1 along it, so nearly every pick goes to them, which one data rank holds when experts are
spread over ``data=2``: the other receives almost nothing (dropless: the same losses).
"""

from __future__ import annotations

import traceback

import torch
import torch.distributed as dist

import partitioner_checks as pc
from fastllm import models, nn, optim, random, tree
from fastllm.models import serialize
from fastllm.models.config import MoEConfig
from fastllm.nn.loss import IGNORE_INDEX
from fastllm.sharding import COMPUTE_RULES, Mesh, MeshLayout, Partitioner, shard, zero
from fastllm.sharding import checkpoint as sharded
from fastllm.sharding.spec import is_spec
from fastllm.train.state import TrainState
from fastllm.train.step import TrainStep

AUX = ("moe_aux_loss", "router_z_loss")
EXPERTS_OVER_DATA = COMPUTE_RULES.replace("experts", "data")
EXPERTS_OVER_TENSOR = COMPUTE_RULES.replace("experts", "tensor")


def sp(rules):
    return rules.replace("seq", "tensor")


def config(capacity_factor: float | None = None):
    moe = MoEConfig(n_experts=4, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01, capacity_factor=capacity_factor)
    return models.preset("tiny-mixtral", moe=moe)


def skewed(params: dict) -> dict:
    """``params`` with routing pulled to experts 0 and 1 (the module docstring)."""
    flat = dict(tree.flatten(params))
    direction = torch.nn.functional.normalize(torch.ones(flat["embed.tokens"].shape[1]), dim=0)
    flat["embed.tokens"] = flat["embed.tokens"] + 0.3 * direction
    for path in [p for p in flat if p.endswith(".moe.router")]:
        flat[path] = flat[path].clone()
        flat[path][:2] += 0.1 * direction
    return tree.unflatten(flat)


def initial_params(cfg, key, skew: bool) -> dict:
    params = models.init(cfg, random.fold_in(key, "params"))
    return skewed(params) if skew else params


# --- one process ---------------------------------------------------------------------------------
def micro_batches(batch: dict, data: int, accum: int) -> list[dict]:
    """The layout's micro-batches as one process sees them: ``i`` joins every data rank's ``i``-th block."""
    ranks = [{name: value.chunk(data)[r] for name, value in batch.items()} for r in range(data)]
    return [{name: torch.cat([rows[name].chunk(accum)[i] for rows in ranks]) for name in batch}
            for i in range(accum)]


def _weight(batch: dict) -> torch.Tensor:
    return (batch["targets"] != IGNORE_INDEX).sum().float()


def reference(cfg, params: dict, data: int, accum: int, optimizer: str) -> dict:
    """One process in plain PyTorch (partitioner_checks.torch_steps) on the layout's micro-batches."""
    batches = pc.batches(cfg)

    def loss_of(current: dict, batch: dict) -> torch.Tensor:
        micros = micro_batches(batch, data, accum)
        total = sum(_weight(m) for m in micros)
        return sum(_weight(m) / total * models.loss(cfg, current, m)[0] for m in micros)

    out = pc.torch_steps(params, optimizer, batches, loss_of)
    return {"params": params, **out, "data": batches,
            "aux": [aux_of(cfg, p, batches[0]) for p in (params, out["final"])]}


def aux_of(cfg, params: dict, batch: dict) -> dict[str, float]:
    with torch.no_grad():
        _, metrics = models.loss(cfg, params, batch)
    return {name: float(value) for name, value in metrics.items() if name in AUX or name == "moe_dropped_fraction"}


# --- the layout --------------------------------------------------------------------------------------
def start(step: TrainStep, key, full: dict, mesh: Mesh) -> TrainState:
    """The step's initial state with the shards of ``full`` (checked against its own init first)."""
    state = step.init_state(key)
    specs, flat = tree.flatten(step.plan.params, is_leaf=is_spec), tree.flatten(full)
    params = tree.map_with_path(lambda path, _: shard(flat[path], specs[path], mesh), state.params)
    owned = zero.to_storage(params, step.plan.data_dims, mesh) if step.partitioner.zero_stage in (1, 2) else params
    return state._replace(params=params, opt_state=step.optimizer.init(owned))


def layout_aux(step: TrainStep, params, batch: dict, mesh: Mesh) -> dict[str, float]:
    """The auxiliary losses of a forward of every rank's rows under the layout."""
    if step.partitioner.zero_stage == 3:
        params = zero.to_compute(params, step.plan.data_dims, mesh, 1 << 20)
    with torch.no_grad():
        carry = nn.run(step.model, params, pc.local_rows(batch, mesh), layout=step.layout)
    return {name: float(carry[name]) for name in (*AUX, "moe_dropped_fraction") if name in carry}


def close_aux(actual: dict, expected: dict, what: str) -> None:
    if set(actual) != set(expected):
        raise AssertionError(f"{what}: metrics {sorted(actual)} vs one process {sorted(expected)}")
    for name, value in expected.items():
        if not abs(actual[name] - value) <= pc.RTOL * abs(value):
            raise AssertionError(f"{what} {name}: {actual[name]!r} vs one process {value!r}")


def check_layout(cfg, ref: dict, key, mesh: Mesh, stage: int, rules, accum: int, optimizer: str,
                 schedule: str = "1f1b") -> None:
    partitioner = Partitioner(mesh, rules=rules, zero_stage=stage, bucket_bytes=pc.BUCKET_BYTES)
    make, clip = pc.OPTIMIZERS[optimizer]
    step = TrainStep(models.model(cfg), partitioner, make(), grad_accum=accum, max_grad_norm=clip, schedule=schedule)
    state = start(step, key, ref["params"], mesh)
    # A pipeline rank holds one stage: no forward of its own gives the aux losses, which its losses
    # and gradients include (checked below).
    whole = mesh.size("pipe") == 1
    if whole:
        close_aux(layout_aux(step, state.params, ref["data"][0], mesh), ref["aux"][0], "at init")
    grads, _, _ = step.gradients(state, pc.local_rows(ref["data"][0], mesh))
    stats = step.overlap_stats
    if stats["started_in_backward"] != stats["buckets"]:
        raise AssertionError(f"every gradient bucket should start during backward: {stats}")
    pc.compare_tree(grads, step.plan.grads, ref["grads"], mesh, "gradient of")
    totals = partitioner.describe(step.plan.model).totals
    held = {"params": pc.nbytes(state.params), "grads": pc.nbytes(grads), "optimizer": pc.nbytes(state.opt_state)}
    for name, value in held.items():
        if (name != "optimizer" or optimizer == "adamw") and value != totals[name]:
            raise AssertionError(f"describe says {totals[name]} bytes of {name} per rank, rank holds {value}")
    state, losses, norms = pc.run_steps(step, state, ref["data"], mesh)
    pc.close_numbers(losses, ref["losses"], "loss")
    pc.close_numbers(norms, ref["norms"], "grad_norm")
    pc.compare_tree(state.params, step.plan.params, ref["final"], mesh, "final param")
    kind = optim.ScaleByAdamState if optimizer == "adamw" else optim.TraceState
    moments = optim.get_state(state.opt_state, kind)
    for name, expected in ref["moments"].items():
        pc.compare_tree(getattr(moments, name), step.plan.opt_state, expected, mesh, f"optimizer {name} of")
    if whole:
        close_aux(layout_aux(step, state.params, ref["data"][0], mesh), ref["aux"][1], "after 5 steps")


# (name, mesh sizes, ZeRO stage, rules, accumulations, options): options ``optimizer`` ("sgd": SGD with
# momentum, no clipping: a gradient summed over the wrong ranks shows directly), ``skew``, ``capacity``.
LAYOUTS = [
    ("data4_experts", dict(data=4), 1, EXPERTS_OVER_DATA, (1, 2), {}),
    ("data4_replicated_experts", dict(data=4), 0, COMPUTE_RULES, (1,), {}),
    ("data2_tensor2_experts", dict(data=2, tensor=2), 0, EXPERTS_OVER_DATA, (1,), {}),
    ("data2_tensor2_experts_zero3", dict(data=2, tensor=2), 3, EXPERTS_OVER_DATA, (1, 2), {}),
    ("data2_tensor2_experts_sp_sgd", dict(data=2, tensor=2), 2, sp(EXPERTS_OVER_DATA), (1,), dict(optimizer="sgd")),
    ("data2_tensor2_experts_over_tensor", dict(data=2, tensor=2), 1, EXPERTS_OVER_TENSOR, (1,), {}),
    ("data2_tensor2_experts_over_tensor_sp_zero3", dict(data=2, tensor=2), 3, sp(EXPERTS_OVER_TENSOR), (2,), {}),
    ("data2_tensor2_experts_skewed", dict(data=2, tensor=2), 1, EXPERTS_OVER_DATA, (1,), dict(skew=True)),
    ("data4_experts_capacity", dict(data=4), 0, EXPERTS_OVER_DATA, (1,), dict(skew=True, capacity=1.0)),
    # a pipeline stage per layer, experts over each stage's data group: the router statistics travel
    # between the stages in the carry, and their gradients back
    ("data2_pipe2_experts", dict(data=2, pipe=2), 1, EXPERTS_OVER_DATA, (2,), {}),
]
WORLD_2_LAYOUTS = [("data2_experts_zero3", dict(data=2), 3, EXPERTS_OVER_DATA, (1, 2), {}),
                   ("pipe2_gpipe", dict(pipe=2), 0, COMPUTE_RULES, (2,), dict(schedule="gpipe"))]


def layout_checks(layouts: list) -> dict[str, str]:
    """Every layout of ``layouts`` (this world's size): ``{check: "ok" | traceback}``. Each reference
    (config, routing, micro-batches, optimizer) is computed once, when first needed."""
    key, refs, report = random.key(7), {}, {}
    for name, sizes, stage, rules, accums, options in layouts:
        optimizer, skew, capacity = (options.get(name, default) for name, default in
                                     (("optimizer", "adamw"), ("skew", False), ("capacity", None)))
        mesh = Mesh(**{"data": 1, "tensor": 1, "pipe": 1, **sizes})
        cfg = config(capacity)
        for accum in accums:
            check = f"{name}/accum{accum}"
            try:
                ref_key = (capacity, skew, mesh.size("data"), accum, optimizer)
                if ref_key not in refs:
                    refs[ref_key] = reference(cfg, initial_params(cfg, key, skew), mesh.size("data"), accum, optimizer)
                check_layout(cfg, refs[ref_key], key, mesh, stage, rules, accum, optimizer,
                             options.get("schedule", "1f1b"))
                report[check] = "ok"
            except Exception:  # noqa: BLE001 - reported per check
                report[check] = traceback.format_exc()
    return report


# --- checkpoints: saved with experts over 4 ranks, resumed on 2 and on 1 ---------------------------------
SAVE_AT = 2


def resume_run(mesh: Mesh, stage: int, rules, path: str, *, resume: bool) -> list[float]:
    """Losses of every step (saving after step ``SAVE_AT`` to ``path``) or, resumed from ``path``, of
    the steps after it."""
    cfg, key = config(), random.key(3)
    step = TrainStep(models.model(cfg), Partitioner(mesh, rules=rules, zero_stage=stage), pc.adamw(),
                     max_grad_norm=pc.CLIP)
    plan, state = step.plan, step.init_state(key)
    specs = {"params": plan.params, "opt_state": sharded.state_specs(state.opt_state, plan.opt_state)}
    first = 0
    if resume:
        trees, meta = sharded.load(path, specs, mesh, like={"params": state.params, "opt_state": state.opt_state})
        state, first = TrainState(trees["params"], trees["opt_state"], meta["step"], key), meta["step"]
    losses = []
    for i, batch in enumerate(pc.batches(cfg)[first:], start=first):
        if i == SAVE_AT and not resume:
            meta = {"step": i, "model_config": serialize.config_to_dict(cfg)}
            sharded.save(path, {"params": state.params, "opt_state": state.opt_state}, specs, mesh, meta)
        state, metrics = step(state, pc.local_rows(batch, mesh))
        losses.append(float(metrics["loss"]))
    return losses


def counts_exchanged_once_per_layer() -> None:
    """A round trip of the routed tokens exchanges counts once: the combine's all-to-all (and every
    move in backward) takes them from the dispatch's note. The layout's trace says which moved."""
    cfg, mesh, trace = config(), Mesh(data=4), []
    params = Partitioner(mesh, rules=EXPERTS_OVER_DATA).init_params(models.model(cfg), random.key(0))
    batch = pc.local_rows(pc.batches(cfg)[0], mesh)
    nn.run(models.model(cfg), params, batch, layout=MeshLayout(mesh, EXPERTS_OVER_DATA, trace=trace))
    moves = [(c.what.split(":")[0], c.what.split("(ragged: ")[1]) for c in trace if "ragged" in c.what]
    expected = [("moe dispatch", "counts, then rows)"), ("moe combine", "rows)")] * cfg.n_layers
    if moves != expected:
        raise AssertionError(f"ragged moves of a forward: {moves}")


def world_4(path: str) -> dict:
    """The layouts of a 4-rank world; then a run with experts over data=4 (ZeRO-1) saving a checkpoint."""
    report = layout_checks(LAYOUTS)
    try:
        counts_exchanged_once_per_layer()
        report["counts exchanged once per layer"] = "ok"
    except Exception:  # noqa: BLE001 - reported like the layouts
        report["counts exchanged once per layer"] = traceback.format_exc()
    report["losses"] = resume_run(Mesh(data=4), 1, EXPERTS_OVER_DATA, path, resume=False)
    dist.barrier()
    return report


def world_2(path: str) -> dict:
    """The layouts of a 2-rank world; the checkpoint resumed with experts over data=2 at ZeRO-3."""
    report = layout_checks(WORLD_2_LAYOUTS)
    report["losses"] = resume_run(Mesh(data=2), 3, EXPERTS_OVER_DATA, path, resume=True)
    return report
