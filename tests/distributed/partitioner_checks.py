"""Checks run inside spawned gloo ranks: every layout trains like one process.

For each model and layout, every rank computes the single-process reference itself (tiny models:
cheap), in plain PyTorch (the model's loss, ``backward``, ``clip_grad_norm_`` and ``torch.optim``:
no code shared with the train step but the model), then runs the step on its shards and
compares: the sharded init against the slice of the unsharded init (bitwise), the gradients after
step 1 (gathered to global tensors), and after 5 steps the losses, the logged grad norms, the final
parameters and every optimizer moment (all within 1e-5 relative to each tensor's largest value),
and the bytes it holds against ``describe``. Returns ``{check name: "ok" | traceback}`` so one
spawn reports every failure at once.

Optimizers: AdamW with weight decay and clipping (a dropped decay or a wrong clip factor moves the
params by far more than 1e-5), and on some layouts SGD with momentum and no clipping (its update
is linear in the gradient: a gradient summed over the wrong ranks, or a clip factor applied when
none was asked for, shows directly). AdamW's ``eps`` is 1e-3 here: with the default 1e-8 an entry
whose gradient is near zero moves by ``lr * g / (|g| + eps)``, which turns rounding-level
differences of ``g`` (summed in another order) into percent-level differences of the update; a
larger ``eps`` keeps the update a smooth function of the gradient, so the comparison is exact to
rounding and still sees every term of the optimizer.

``device`` (default CPU, for the gloo ranks) is where the reference, the batches and the comparisons
live; it must be the mesh's device (``cuda:LOCAL_RANK`` under NCCL, see nccl_partitioner.py).
"""

from __future__ import annotations

import traceback

import torch
import torch.distributed as dist

from fastllm import models, optim, random, tree
from fastllm.sharding import COMPUTE_RULES, Mesh, Partitioner, pipeline, shard, unshard
from fastllm.sharding.spec import is_spec
from fastllm.train.step import TrainStep

STEPS, BATCH, SEQ, LR, CLIP = 5, 8, 16, 3e-3, 0.5
RTOL = 1e-5
BUCKET_BYTES = 64 << 10  # several gradient buckets per tiny model (~400 KiB of fp32 params)
SP_RULES = COMPUTE_RULES.replace("seq", "tensor")  # sequence parallelism is one rule


def adamw():
    return optim.adamw(LR, weight_decay=0.1, eps=1e-3)  # clipping lives in the step (max_grad_norm)


def sgd():
    return optim.sgd(0.3, momentum=0.9)


OPTIMIZERS = {"adamw": (adamw, CLIP), "sgd": (sgd, None)}


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


def run_steps(step: TrainStep, state, data: list[dict], mesh: Mesh):
    """(final state, losses, grad norms) of the step over the batches (this data rank's rows)."""
    losses, norms = [], []
    for batch in data:
        state, metrics = step(state, local_rows(batch, mesh))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return state, losses, norms


def check_tied_copies(params, plan, mesh: Mesh) -> None:
    """A leaf two pipeline stages hold (a tied embedding) has the same bits on both after the steps."""
    shared = sorted(path for path, stages in plan.stages_of.items() if len(stages) > 1)
    if mesh.size("pipe") == 1 or not shared:
        return
    flat = tree.flatten(params)
    mine = {path: flat[path] if path in flat else None for path in shared}
    copies: list = [None] * mesh.size("pipe")
    dist.all_gather_object(copies, mine, group=mesh.group("pipe"))
    for path in shared:
        held = [copy[path] for copy in copies if copy[path] is not None]
        if len(held) != len(plan.stages_of[path]) or not all(torch.equal(held[0], t) for t in held[1:]):
            raise AssertionError(f"the copies of tied {path} on stages {plan.stages_of[path]} differ")


def _torch_optimizer(optimizer: str, leaves: dict[str, torch.Tensor]) -> torch.optim.Optimizer:
    """The same optimizer from ``torch.optim``: the reference shares no optimizer code with the step."""
    if optimizer == "sgd":
        return torch.optim.SGD(list(leaves.values()), lr=0.3, momentum=0.9)
    decayed = [t for path, t in leaves.items() if optim.default_decay_mask(path, t)]
    others = [t for path, t in leaves.items() if not optim.default_decay_mask(path, t)]
    return torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                             lr=LR, betas=(0.9, 0.999), eps=1e-3)


def _moments(optimizer: str, state: dict, leaves: dict[str, torch.Tensor]) -> dict[str, dict]:
    names = {"sgd": {"trace": "momentum_buffer"}, "adamw": {"mu": "exp_avg", "nu": "exp_avg_sq"}}[optimizer]
    return {ours: tree.unflatten({path: state[t][theirs].clone() for path, t in leaves.items()})
            for ours, theirs in names.items()}


def reference(config, key, optimizer: str, device: torch.device | str = "cpu") -> dict:
    """One process on ``device``, in plain PyTorch: the model's loss, ``backward``,
    ``clip_grad_norm_`` and ``torch.optim`` (AdamW with per-group decay, or SGD). Params at init,
    gradients of step 1, losses, grad norms, final params and optimizer moments."""
    init = models.init(config, random.fold_in(key, "params"), device=device)
    data = batches(config, device=device)
    return {"params": init, **torch_steps(init, optimizer, data, lambda params, batch: models.loss(config, params, batch)[0]),
            "data": data}


def torch_steps(init: dict, optimizer: str, data: list[dict], loss_of) -> dict:
    """A step per batch of ``data`` from the params ``init``: ``loss_of(params, batch)``, backward,
    ``clip_grad_norm_`` and ``torch.optim``. Gradients of step 1, losses, grad norms, final params
    and optimizer moments."""
    _, clip = OPTIMIZERS[optimizer]
    leaves = {path: t.clone().requires_grad_(True) for path, t in tree.flatten(init).items()}
    params = tree.unflatten(leaves)
    opt = _torch_optimizer(optimizer, leaves)
    losses, norms, first_grads = [], [], None
    for batch in data:
        opt.zero_grad()
        loss = loss_of(params, batch)
        loss.backward()
        if first_grads is None:
            first_grads = tree.unflatten({path: t.grad.clone() for path, t in leaves.items()})
        norm = torch.nn.utils.clip_grad_norm_(list(leaves.values()), clip if clip is not None else float("inf"))
        opt.step()
        losses.append(float(loss.detach()))
        norms.append(float(norm))
    final = tree.unflatten({path: t.detach().clone() for path, t in leaves.items()})
    return {"grads": first_grads, "losses": losses, "norms": norms, "final": final,
            "moments": _moments(optimizer, opt.state, leaves)}


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    if not error <= RTOL * max(scale, 1e-30):
        raise AssertionError(f"{what}: max error {error:.3g} vs max magnitude {scale:.3g}")


def close_numbers(actual: list[float], expected: list[float], what: str) -> None:
    for i, (a, b) in enumerate(zip(actual, expected)):
        if not abs(a - b) <= RTOL * abs(b):
            raise AssertionError(f"{what} of step {i + 1}: {a!r} vs one process {b!r} (all: {actual} vs {expected})")


def local_rows(batch: dict, mesh: Mesh) -> dict:
    n, me = mesh.size("data"), mesh.rank("data")
    return {name: value.chunk(n)[me] for name, value in batch.items()}


def nbytes(values) -> int:
    return sum(t.numel() * t.element_size() for t in tree.leaves(values) if t.ndim > 0)


def compare_tree(values, specs, expected, mesh: Mesh, what: str) -> None:
    """Each shard of ``values`` (laid out by the spec tree ``specs``) against the whole tensors."""
    flat_specs = tree.flatten(specs, is_leaf=is_spec)
    flat_expected = tree.flatten(expected)
    for path, value in tree.flatten(values).items():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            close(unshard(value, flat_specs[path], mesh), flat_expected[path], f"{what} {path}")


def check_overlap(step: TrainStep, config, mesh: Mesh, zero_stage: int, remat: bool, transport: str = "auto") -> None:
    """The overlap path really overlapped: every gradient bucket started during backward, and ZeRO-3
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
        copy_engines = transport == "copy_engine" or (transport == "auto" and mesh.backend == "nccl")
        if copy_engines != (stats["copy_engine_gathers"] >= config.n_layers):
            raise AssertionError(f"ZeRO-3 transport {transport!r} on {mesh.backend}: copy-engine gathers "
                                 f"expected {'for every block' if copy_engines else 'none'}: {stats}")


def check_layout(config, ref: dict, key, mesh: Mesh, zero_stage: int, rules, grad_accum: int, optimizer: str,
                 overlap: bool = True, remat: bool = False, transport: str = "auto", schedule: str = "1f1b",
                 virtual_stages: int = 1) -> TrainStep:
    partitioner = Partitioner(mesh, rules=rules, zero_stage=zero_stage, overlap=overlap, bucket_bytes=BUCKET_BYTES,
                              transport=transport, virtual_stages=virtual_stages)
    make, clip = OPTIMIZERS[optimizer]
    step = TrainStep(models.model(config), partitioner, make(), grad_accum=grad_accum, max_grad_norm=clip,
                     remat=remat, schedule=schedule)
    plan = step.plan
    state = step.init_state(key)
    flat_specs = tree.flatten(plan.params, is_leaf=is_spec)
    for path, value in tree.flatten(state.params).items():
        expected = shard(tree.flatten(ref["params"])[path], flat_specs[path], mesh)
        if not torch.equal(value, expected):
            raise AssertionError(f"sharded init of {path} differs from the slice of the full init")
    grads, _, _ = step.gradients(state, local_rows(ref["data"][0], mesh))
    if mesh.size("pipe") > 1:  # the executor ran exactly the schedule `fastllm plan` prints
        printed = pipeline.schedule(schedule, mesh.size("pipe"), grad_accum, virtual_stages)[mesh.rank("pipe")]
        if step.pipeline.executed != printed:
            raise AssertionError(f"the executor ran {[str(a) for a in step.pipeline.executed]}, the schedule "
                                 f"says {[str(a) for a in printed]}")
    if overlap and mesh.size("pipe") == 1:  # a pipeline reduces after its schedule
        check_overlap(step, config, mesh, zero_stage, remat, transport)
    compare_tree(grads, plan.grads, ref["grads"], mesh, "gradient of")
    totals = partitioner.describe(plan.model).totals
    held = {"params": nbytes(state.params), "grads": nbytes(grads), "optimizer": nbytes(state.opt_state)}
    for name, value in held.items():
        if name != "optimizer" or optimizer == "adamw":  # describe counts Adam's two moments
            if value != totals[name]:
                raise AssertionError(f"describe says {totals[name]} bytes of {name} per rank, rank holds {value}")
    state, losses, norms = run_steps(step, state, ref["data"], mesh)
    check_tied_copies(state.params, plan, mesh)
    close_numbers(losses, ref["losses"], "loss")
    close_numbers(norms, ref["norms"], "grad_norm")
    compare_tree(state.params, plan.params, ref["final"], mesh, "final param")
    kind = optim.ScaleByAdamState if optimizer == "adamw" else optim.TraceState
    moments = optim.get_state(state.opt_state, kind)
    for name, expected in ref["moments"].items():
        compare_tree(getattr(moments, name), plan.opt_state, expected, mesh, f"optimizer {name} of")
    return step


# (name, mesh sizes, zero stage, rules, options): communication overlapped with compute by default
# (fastllm/sharding/overlap.py); "sync" layouts run every collective in place (overlap=False),
# "remat" ones recompute blocks (ZeRO-3 re-gathers them in backward, prefetched), "sgd" ones train
# with SGD + momentum and no clipping instead of AdamW.
LAYOUTS = [
    ("data4_zero1", dict(data=4), 1, COMPUTE_RULES, {}),
    ("data4_zero2", dict(data=4), 2, COMPUTE_RULES, {}),
    ("data4_zero3", dict(data=4), 3, COMPUTE_RULES, {}),
    ("data4_zero3_sgd", dict(data=4), 3, COMPUTE_RULES, dict(optimizer="sgd")),
    ("data4_zero3_remat", dict(data=4), 3, COMPUTE_RULES, dict(remat=True)),
    ("tensor4", dict(tensor=4), 0, COMPUTE_RULES, {}),
    ("tensor4_sp", dict(tensor=4), 0, SP_RULES, {}),
    ("tensor4_sp_sgd", dict(tensor=4), 0, SP_RULES, dict(optimizer="sgd")),
    ("data2_tensor2_zero3", dict(data=2, tensor=2), 3, COMPUTE_RULES, {}),
    ("data2_tensor2_zero3_sp", dict(data=2, tensor=2), 3, SP_RULES, {}),
    ("data2_tensor2_zero3_sp_remat", dict(data=2, tensor=2), 3, SP_RULES, dict(remat=True)),
    ("data4_zero2_sync", dict(data=4), 2, COMPUTE_RULES, dict(overlap=False)),
    ("data4_zero3_sync", dict(data=4), 3, COMPUTE_RULES, dict(overlap=False)),
    ("data2_tensor2_zero3_sp_sync", dict(data=2, tensor=2), 3, SP_RULES, dict(overlap=False)),
]


# Pipelines (each list runs in a world of its size): every schedule at pipe=2, pipe=4 (tiny Qwen2's
# embedding table is shared by the first and the last stage), pipe with data and tensor, and ZeRO
# inside each stage's data group. Pipelines need as many repeated layers as chunks: 4 or 8 layers.
PIPELINE_LAYOUTS = {
    2: [("pipe2_1f1b", dict(pipe=2), 0, COMPUTE_RULES, dict(schedule="1f1b")),
        ("pipe2_gpipe", dict(pipe=2), 0, COMPUTE_RULES, dict(schedule="gpipe")),
        ("pipe2_interleaved", dict(pipe=2), 0, COMPUTE_RULES, dict(schedule="interleaved", virtual_stages=2)),
        ("pipe2_1f1b_sgd_remat", dict(pipe=2), 0, COMPUTE_RULES, dict(optimizer="sgd", remat=True))],
    4: [("pipe4_1f1b", dict(pipe=4), 0, COMPUTE_RULES, dict(schedule="1f1b")),
        ("pipe4_interleaved", dict(pipe=4), 0, COMPUTE_RULES, dict(schedule="interleaved", virtual_stages=2)),
        ("data2_pipe2_zero3", dict(data=2, pipe=2), 3, COMPUTE_RULES, {}),
        ("tensor2_pipe2_sp", dict(tensor=2, pipe=2), 0, SP_RULES, {})],
    8: [("data2_tensor2_pipe2_zero1", dict(data=2, tensor=2, pipe=2), 1, SP_RULES, {}),
        ("data2_tensor2_pipe2_zero3", dict(data=2, tensor=2, pipe=2), 3, COMPUTE_RULES, {})],
}


def layout_checks(preset: str, grad_accums: tuple[int, ...] = (1, 2), device: torch.device | str = "cpu",
                  layouts: list | None = None) -> dict[str, str]:
    """Every layout of ``layouts`` (default LAYOUTS) for one tiny preset; tensor=4 needs 4 KV heads
    (the tiny presets have 2), so those layouts use the preset with ``n_kv_heads=4``, and pipelines
    use 8 layers. The reference of each (config, optimizer) is computed once, on ``device``, when a
    layout first needs it."""
    key, device = random.key(7), torch.device(device)
    refs: dict = {}
    report = {}
    for name, sizes, stage, rules, options in LAYOUTS if layouts is None else layouts:
        options = dict(options)
        optimizer = options.pop("optimizer", "adamw")
        mesh = Mesh(**{"data": 1, "tensor": 1, **sizes})
        if mesh.device != device:
            raise ValueError(f"layout {name}: the mesh computes on {mesh.device} but the reference was "
                             f"asked for on {device}; pass device=mesh.device")
        shape = (4 if mesh.size("tensor") == 4 else 2, 8 if mesh.size("pipe") > 1 else 2)
        config = models.preset(preset, n_kv_heads=shape[0], n_layers=shape[1])
        if (shape, optimizer) not in refs:
            refs[shape, optimizer] = reference(config, key, optimizer, device)
        for accum in grad_accums:
            if mesh.size("pipe") > 1:
                accum *= mesh.size("pipe")  # micro-batches in flight on every stage (interleaved: a multiple of pipe)
            check = f"{preset}/{name}/accum{accum}"
            try:
                check_layout(config, refs[shape, optimizer], key, mesh, stage, rules, accum, optimizer, **options)
                report[check] = "ok"
            except Exception:  # noqa: BLE001 - reported per check
                report[check] = traceback.format_exc()
    return report


# Accumulation is one code path for every layout: these run it again at 2 micro-batches, where it
# meets overlap (ZeRO-2/3 buckets across micro-batches, synchronous too) and sequence parallelism.
ACCUMULATED = ("data4_zero2", "data4_zero3", "data4_zero3_sync", "tensor4_sp", "data2_tensor2_zero3_sp")
# Tiny Qwen2's tied table and biases under each way the table or the heads are split.
TIED = ("data4_zero1", "data4_zero3", "tensor4", "tensor4_sp", "data2_tensor2_zero3_sp")


def matrix_checks(preset: str, names: tuple[str, ...], accumulated: tuple[str, ...] = ()) -> dict[str, str]:
    """The LAYOUTS named ``names`` without accumulation, and those named ``accumulated`` with 2."""
    report = layout_checks(preset, (1,), layouts=[layout for layout in LAYOUTS if layout[0] in names])
    report.update(layout_checks(preset, (2,), layouts=[layout for layout in LAYOUTS if layout[0] in accumulated]))
    return report


def pipeline_checks(preset: str, grad_accums: tuple[int, ...] = (1, 2)) -> dict[str, str]:
    """The pipeline layouts of this world's size (see PIPELINE_LAYOUTS)."""
    return layout_checks(preset, grad_accums, layouts=PIPELINE_LAYOUTS[dist.get_world_size()])


def transport_checks() -> dict[str, str]:
    """On gloo: ``transport="copy_engine"`` refuses with the reason; ``"auto"`` keeps NCCL-style
    collectives (checked by every layout above through ``check_overlap``)."""
    mesh = Mesh(data=dist.get_world_size())
    config = models.preset("tiny-llama")
    step = TrainStep(models.model(config), Partitioner(mesh, zero_stage=3, transport="copy_engine"), optim.adamw(LR))
    state = step.init_state(random.key(0))
    batch = local_rows(batches(config)[0], mesh)
    try:
        step(state, batch)
    except RuntimeError as error:
        message = str(error)
        if "copy_engine" in message and "CUDA and NCCL" in message:
            return {"copy_engine on gloo": "ok"}
        return {"copy_engine on gloo": f"unclear error: {message}"}
    return {"copy_engine on gloo": "no error"}
