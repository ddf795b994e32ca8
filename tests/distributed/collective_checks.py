"""Checks run inside spawned gloo ranks: each parallel computation against the same maths on one rank.

Every rank rebuilds its group's inputs from seeds (global rank, name), computes the reference with
plain single-process autograd, and compares its own forward output and gradients. The objective of
a parallel run is the sum over ranks of each rank's loss (see fastllm/sharding/collectives.py), so
the references sum the per-rank losses too (a loss replicated after an all-reduce counts once).
Each check returns a (name, traceback-or-"ok") pair so one spawned run reports every failure at once.
"""

from __future__ import annotations

import traceback
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastllm.sharding import Mesh, PartitionSpec, collectives as C, shard, unshard
from fastllm.sharding import collectives as raw

SHAPE = (4, 8, 12)  # every dim divisible by 2 and by 4


def device() -> torch.device:
    """The rank's device: its GPU under NCCL (nccl_checks.py), else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rand(seed_name: str, global_rank: int, shape) -> torch.Tensor:
    seed = zlib.crc32(f"{seed_name}/{global_rank}".encode())
    value = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return value.to(device())


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: got shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if not torch.allclose(actual, expected, rtol=1e-10, atol=1e-10):
        raise AssertionError(f"{what}: max difference {(actual - expected).abs().max().item():.3g}")


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


# --- one check per collective ------------------------------------------------------------------
def check_all_gather(mesh: Mesh, axis: str, dim: int) -> None:
    members, me = mesh.ranks(axis), mesh.rank(axis)
    shards = [rand("x", r, SHAPE) for r in members]
    full_shape = list(SHAPE)
    full_shape[dim] *= len(members)
    weights = [rand("w", r, full_shape) for r in members]
    x = leaf(shards[me])
    y = C.all_gather(x, dim, axis, mesh)
    (y * weights[me]).sum().backward()
    X = leaf(torch.cat(shards, dim))
    sum((X * w).sum() for w in weights).backward()
    close(y, X.detach(), "forward")
    close(x.grad, X.grad.chunk(len(members), dim)[me], "backward")


def check_reduce_scatter(mesh: Mesh, axis: str, dim: int) -> None:
    members, me = mesh.ranks(axis), mesh.rank(axis)
    partials = [rand("x", r, SHAPE) for r in members]
    local_shape = list(SHAPE)
    local_shape[dim] //= len(members)
    weights = [rand("w", r, local_shape) for r in members]
    x = leaf(partials[me])
    y = C.reduce_scatter(x, dim, axis, mesh)
    (y * weights[me]).sum().backward()
    xs = [leaf(p) for p in partials]
    total = sum(xs)
    sum((part * w).sum() for part, w in zip(total.chunk(len(members), dim), weights)).backward()
    close(y, total.detach().chunk(len(members), dim)[me], "forward")
    close(x.grad, xs[me].grad, "backward")


def check_all_reduce(mesh: Mesh, axis: str) -> None:
    members, me = mesh.ranks(axis), mesh.rank(axis)
    partials = [rand("x", r, SHAPE) for r in members]
    weight = rand("w", members[0], SHAPE)  # the loss after g is replicated: same on every rank
    x = leaf(partials[me])
    y = C.all_reduce(x, axis, mesh)
    (y * weight).sum().backward()
    xs = [leaf(p) for p in partials]
    (sum(xs) * weight).sum().backward()
    close(y, sum(partials), "forward")
    close(x.grad, xs[me].grad, "backward")


def check_copy_to_parallel(mesh: Mesh, axis: str) -> None:
    members, me = mesh.ranks(axis), mesh.rank(axis)
    value = rand("x", members[0], SHAPE)  # replicated input
    weights = [rand("w", r, SHAPE) for r in members]
    x = leaf(value)
    y = C.copy_to_parallel(x, axis, mesh)
    (y * weights[me]).sum().backward()
    X = leaf(value)
    sum((X * w).sum() for w in weights).backward()
    close(y, value, "forward")
    close(x.grad, X.grad, "backward")


def check_split(mesh: Mesh, axis: str, dim: int) -> None:
    members, me = mesh.ranks(axis), mesh.rank(axis)
    value = rand("x", members[0], SHAPE)
    local_shape = list(SHAPE)
    local_shape[dim] //= len(members)
    weights = [rand("w", r, local_shape) for r in members]
    x = leaf(value)
    y = C.split(x, dim, axis, mesh)
    (y * weights[me]).sum().backward()
    X = leaf(value)
    sum((part * w).sum() for part, w in zip(X.chunk(len(members), dim), weights)).backward()
    close(y, value.chunk(len(members), dim)[me], "forward")
    close(x.grad, X.grad, "backward")


def check_all_to_all(mesh: Mesh, axis: str, split_dim: int, concat_dim: int) -> None:
    """Input sharded along concat_dim, output sharded along split_dim, of one global tensor."""
    members, me, n = mesh.ranks(axis), mesh.rank(axis), mesh.size(axis)
    value = rand("x", members[0], SHAPE)
    out_weights = [rand("w", r, value.chunk(n, split_dim)[0].shape) for r in members]
    x = leaf(value.chunk(n, concat_dim)[me])
    y = C.all_to_all(x, split_dim, concat_dim, axis, mesh)
    (y * out_weights[me]).sum().backward()
    X = leaf(value)
    sum((part * w).sum() for part, w in zip(X.chunk(n, split_dim), out_weights)).backward()
    close(y, value.chunk(n, split_dim)[me], "forward")
    close(x.grad, X.grad.chunk(n, concat_dim)[me], "backward")


def check_fallbacks(mesh: Mesh, axis: str) -> None:
    """The list-based paths for backends without single-buffer collectives equal the fast ones."""
    group, n = mesh.group(axis), mesh.size(axis)
    x = rand("x", mesh.global_rank, (2 * n, 3))
    close(raw._gather0_by_list(x, group, n), raw._gather0(x, group, n), "all_gather fallback")
    reduced = raw._reduce_scatter0(x, group, n)
    close(raw._reduce_scatter0_by_all_reduce(x, group, n), reduced, "reduce_scatter fallback")
    close(raw._all_to_all0_by_list(x, group, n), raw._all_to_all0(x, group, n), "all_to_all fallback")


# --- layouts the rules will produce ------------------------------------------------------------
def check_groups(mesh: Mesh, axis: str) -> None:
    """The group along ``axis`` holds exactly mesh.ranks(axis), in coordinate order."""
    me = torch.tensor([float(mesh.global_rank)], dtype=torch.float64, device=device())
    got = C.all_gather(me, 0, axis, mesh)
    close(got, torch.tensor(mesh.ranks(axis), dtype=torch.float64, device=device()), "group members")
    assert mesh.rank_of(mesh.coords) == mesh.global_rank == dist.get_rank()


def check_shard_roundtrip(mesh: Mesh, spec: PartitionSpec) -> None:
    value = rand("full", 0, (8, 4, 4)[: len(spec)])
    local = shard(value, spec, mesh)
    close(unshard(local, spec, mesh), value, f"unshard(shard(x, {spec}))")


def check_megatron_mlp(mesh: Mesh, sequence_parallel: bool) -> None:
    """Column- then row-parallel MLP over ``tensor`` equals the one-rank MLP (loss and grads).

    Tensor parallel: x replicated, f before the column matmul, g after the row matmul.
    Sequence parallel: x split along seq, all-gather before and reduce-scatter after.
    """
    axis, n = "tensor", mesh.size("tensor")
    x_full, w_up, w_down = rand("x", 0, (8, 4)), rand("up", 0, (8, 4)), rand("down", 0, (4, 8))  # [seq, embed]
    target = rand("t", 0, (8, 4))
    column, row = PartitionSpec("tensor", None), PartitionSpec(None, "tensor")
    up, down = leaf(shard(w_up, column, mesh)), leaf(shard(w_down, row, mesh))
    if sequence_parallel:
        x = leaf(x_full.chunk(n, 0)[mesh.rank(axis)])
        h = C.all_gather(x, 0, axis, mesh)  # [seq, embed]
    else:
        x = leaf(x_full)
        h = C.copy_to_parallel(x, axis, mesh)
    partial = F.linear(F.gelu(F.linear(h, up)), down)  # [seq, embed], a partial sum over mlp shards
    if sequence_parallel:
        out = C.reduce_scatter(partial, 0, axis, mesh)  # [seq / n, embed]
        loss = ((out - target.chunk(n, 0)[mesh.rank(axis)]) ** 2).sum()  # summed over ranks
    else:
        out = C.all_reduce(partial, axis, mesh)
        loss = ((out - target) ** 2).sum()  # replicated: every rank backpropagates the whole loss
    loss.backward()
    refs = [leaf(t) for t in (x_full, w_up, w_down)]
    ref_loss = ((F.linear(F.gelu(F.linear(refs[0], refs[1])), refs[2]) - target) ** 2).sum()
    ref_loss.backward()
    total = C.all_reduce(loss.detach(), axis, mesh) if sequence_parallel else loss.detach()
    close(total, ref_loss.detach(), "loss")
    x_grad = refs[0].grad.chunk(n, 0)[mesh.rank(axis)] if sequence_parallel else refs[0].grad
    close(x.grad, x_grad, "grad x")
    close(up.grad, shard(refs[1].grad, column, mesh), "grad w_up")
    close(down.grad, shard(refs[2].grad, row, mesh), "grad w_down")


# --- entry points for testing.run --------------------------------------------------------------
def _run_all(checks) -> dict[str, str]:
    report = {}
    for name, check in checks:
        try:
            check()
            report[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the parent, which fails the test
            report[name] = traceback.format_exc()
    return report


def _collective_checks(mesh: Mesh, axes: tuple[str, ...], tag: str) -> list:
    checks = []
    for axis in axes:
        name = f"{tag}/{axis}"
        checks += [(f"groups/{name}", lambda a=axis: check_groups(mesh, a))]
        for dim in range(len(SHAPE)):
            checks += [
                (f"all_gather/{name}/dim{dim}", lambda a=axis, d=dim: check_all_gather(mesh, a, d)),
                (f"reduce_scatter/{name}/dim{dim}", lambda a=axis, d=dim: check_reduce_scatter(mesh, a, d)),
                (f"split/{name}/dim{dim}", lambda a=axis, d=dim: check_split(mesh, a, d)),
            ]
        checks += [
            (f"all_reduce/{name}", lambda a=axis: check_all_reduce(mesh, a)),
            (f"copy_to_parallel/{name}", lambda a=axis: check_copy_to_parallel(mesh, a)),
            (f"all_to_all/{name}/2->0", lambda a=axis: check_all_to_all(mesh, a, 2, 0)),
            (f"all_to_all/{name}/0->2", lambda a=axis: check_all_to_all(mesh, a, 0, 2)),
            (f"all_to_all/{name}/1->2", lambda a=axis: check_all_to_all(mesh, a, 1, 2)),
        ]
        if mesh.size(axis) > 1:  # an axis of size 1 has no group: collectives return early
            checks += [(f"fallbacks/{name}", lambda a=axis: check_fallbacks(mesh, a))]
    return checks


def world_2_checks() -> dict[str, str]:
    """data=-1 fills the world of 2; tensor=1 makes its collectives identities."""
    mesh = Mesh.from_env(data=-1)
    checks = [("from_env_fills_data", lambda: _expect(mesh.shape == {"pipe": 1, "data": 2, "tensor": 1}, mesh))]
    return _run_all(checks + _collective_checks(mesh, ("data", "tensor"), "d2"))


def world_4_checks(specs: list[tuple]) -> dict[str, str]:
    """On a data=2 x tensor=2 mesh (groups {0,1},{2,3} along tensor; {0,2},{1,3} along data): every
    collective per axis, shard/unshard round trips, the Megatron MLP (tp and sp), the size error.
    Then a second mesh over the same world, tensor=4 (its group is the whole world)."""
    mesh = Mesh.from_env(data=2, tensor=2)
    checks = _collective_checks(mesh, ("data", "tensor"), "d2t2")
    checks += [(f"roundtrip/{spec}", lambda s=PartitionSpec(*spec): check_shard_roundtrip(mesh, s)) for spec in specs]
    checks += [
        ("megatron_mlp/tp", lambda: check_megatron_mlp(mesh, sequence_parallel=False)),
        ("megatron_mlp/sp", lambda: check_megatron_mlp(mesh, sequence_parallel=True)),
        ("mesh_size_error", lambda: check_size_error(mesh)),
    ]
    report = _run_all(checks)
    wide = Mesh(data=1, tensor=4)
    return {**report, **_run_all(_collective_checks(wide, ("tensor",), "t4"))}


def _expect(condition: bool, detail) -> None:
    if not condition:
        raise AssertionError(f"unexpected: {detail}")


def check_size_error(mesh: Mesh) -> None:
    try:
        Mesh(data=3, tensor=1)
    except ValueError as error:
        assert f"the world has {mesh.world_size}" in str(error), str(error)
    else:
        raise AssertionError("Mesh(data=3) on a world of 4 did not raise")


def raise_on_rank_one() -> int:
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    return dist.get_rank()


def hang_on_rank_one() -> int:
    import time

    if dist.get_rank() == 1:
        time.sleep(600)
    return dist.get_rank()
