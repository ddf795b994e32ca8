"""Sharded checkpoints: save under data=2 x tensor=2 (4 gloo ranks), load under other meshes.

Every rank builds the same global trees (a tiny Llama's params, an AdamW state with random moments,
and a mixed-dtype tree), saves its shards, then loads under other layouts; each loaded block must
equal, bit for bit, the block ``shard`` cuts from the global tensor under the new layout. Ranks run
many checks per spawn (startup costs seconds) and report each one.
"""

import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from fastllm import checkpoint, hf, models, optim, random, tree
from fastllm.models import serialize
from fastllm.sharding import COMPUTE_RULES, STORAGE_RULES, Mesh, PartitionSpec, Rules, is_spec, resolve, shard
from fastllm.sharding import checkpoint as sharded
from fastllm.sharding import testing

pytestmark = pytest.mark.distributed

CONFIG = models.preset("tiny-llama")  # 4 heads, 2 KV heads, vocab 256, embed 64, mlp 128
# tensor=4 cannot split 2 KV heads: keep them whole on every rank (docs/sharding.md).
TENSOR_RULES = Rules((("kv_heads", None),)) + COMPUTE_RULES


def global_trees() -> dict:
    """The same trees on every rank: params, AdamW state with non-zero moments, mixed dtypes."""
    params = models.init(CONFIG, random.key(0))
    state = optim.adamw(1e-3).init(params)
    gen = torch.Generator().manual_seed(1)
    state = tree.map(lambda t: torch.randn(t.shape, generator=gen) if t.ndim else t + 7, state)
    extra = {"bf16": torch.randn(8, 12, generator=gen).to(torch.bfloat16),
             "ids": torch.arange(32, dtype=torch.int64).reshape(4, 8), "scalar": torch.tensor(2.5),
             "interval": 100, "name": "run-a"}
    return {"params": params, "opt_state": state, "extra": extra}


def spec_trees(trees: dict, mesh: Mesh, rules) -> dict:
    axes = models.logical_axes(CONFIG)
    extra_axes = {"bf16": ("embed", "mlp"), "ids": ("mlp", "embed"), "scalar": (), "interval": (), "name": ()}
    all_axes = {"params": axes, "opt_state": optim.state_axes(trees["opt_state"], axes), "extra": extra_axes}
    shapes = {name: tree.map(lambda t: getattr(t, "shape", ()), trees[name]) for name in trees}
    return {name: resolve(all_axes[name], shapes[name], mesh, rules) for name in trees}


def local_trees(trees: dict, specs: dict, mesh: Mesh) -> dict:
    """This rank's blocks under ``specs``, mapped over the value trees (an ``EmptyState`` has a 0-d
    spec but no value leaf)."""
    def cut(name, path, leaf):
        spec = tree.flatten(specs[name], is_leaf=is_spec)[path]
        return shard(leaf, spec, mesh) if isinstance(leaf, torch.Tensor) else leaf

    return {name: tree.map_with_path(lambda path, leaf: cut(name, path, leaf), trees[name]) for name in trees}


def mismatches(loaded: dict, expected: dict) -> list[str]:
    """Paths whose loaded value differs from the expected (bitwise, dtype and structure too)."""
    bad = []
    for name in expected:
        got, want = tree.flatten(loaded[name]), tree.flatten(expected[name])
        if list(got) != list(want):
            bad.append(f"{name}: paths {sorted(set(got) ^ set(want))[:5]}")
        for path in want:
            a, b = got.get(path), want[path]
            if isinstance(b, torch.Tensor):
                same = isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            else:
                same = type(a) is type(b) and a == b
            if not same:
                bad.append(f"{name}.{path}")
        if type(loaded[name]) is not type(expected[name]):
            bad.append(f"{name}: container {type(loaded[name]).__name__}")
    return bad


def check(report: dict, name: str, fn) -> None:
    try:
        outcome = fn()
        report[name] = "ok" if outcome in (None, []) else f"failed: {outcome}"
    except Exception as error:  # noqa: BLE001 - reported per check
        report[name] = f"raised {type(error).__name__}: {error}"


def expect_error(fn, *needles: str):
    try:
        fn()
    except sharded.CheckpointError as error:
        missing = [n for n in needles if n not in str(error)]
        return f"message lacks {missing}: {error}" if missing else None
    return "no error raised"


def load_under(path: str, mesh: Mesh, rules) -> list[str]:
    trees = global_trees()
    specs = spec_trees(trees, mesh, rules)
    expected = local_trees(trees, specs, mesh)
    loaded, metadata = sharded.load(path, specs, mesh, like=expected)
    bad = mismatches(loaded, expected)
    return bad + ([] if metadata == {"step": 7} else [f"metadata {metadata}"])


def save_and_reshard_world_4(root: str) -> dict:
    """Rank body: save at data=2 x tensor=2, check the error paths, load at data=4 and tensor=4."""
    report, path = {}, os.path.join(root, "step-00000007")
    mesh = Mesh(data=2, tensor=2)
    trees = global_trees()
    specs = spec_trees(trees, mesh, STORAGE_RULES)
    local = local_trees(trees, specs, mesh)

    def failing_rank(stage):
        if stage == "shards_written" and mesh.global_rank == 2:
            raise OSError("disk full on purpose")

    check(report, "failed write on one rank aborts all, leaves nothing", lambda: expect_error(
        lambda: sharded.save(path, local, specs, mesh, {"step": 7}, _hook=failing_rank),
        "rank 2", "disk full on purpose") or (os.listdir(root) if os.listdir(root) else None))
    wrong = {**local, "params": {**local["params"], "lm_head": {"w": local["params"]["lm_head"]["w"], "b": torch.zeros(3)}}}
    check(report, "save rejects a tree that does not match its specs", lambda: expect_error(
        lambda: sharded.save(path, wrong, specs, mesh), "'params'", "lm_head.b"))
    check(report, "save", lambda: sharded.save(path, local, specs, mesh, {"step": 7}) and None)
    check(report, "complete", lambda: None if checkpoint.latest(root) == Path(path) else os.listdir(root))
    check(report, "load, same layout", lambda: load_under(path, mesh, STORAGE_RULES))
    check(report, "load at data=4", lambda: load_under(path, Mesh(data=4), STORAGE_RULES))
    check(report, "load at tensor=4", lambda: load_under(path, Mesh(data=1, tensor=4), TENSOR_RULES))
    fewer = {**specs, "params": {k: v for k, v in specs["params"].items() if k != "final_norm"}}
    check(report, "load rejects a param tree without a stored path", lambda: expect_error(
        lambda: sharded.load(path, fewer, mesh), "'params'", "final_norm.scale"))
    report.update(resume_world_4(os.path.join(root, "resume-00000002")))
    return report


def reshard_world_2(path: str) -> dict:
    report = {}
    check(report, "load at data=2", lambda: load_under(path, Mesh(data=2), STORAGE_RULES))
    check(report, "load at tensor=2", lambda: load_under(path, Mesh(data=1, tensor=2), TENSOR_RULES))
    return report


def assert_all_ok(reports: list[dict]) -> None:
    failures = [f"rank {r} {name}: {outcome}" for r, report in enumerate(reports)
                for name, outcome in report.items() if outcome != "ok"]
    assert reports and all(reports), "checks did not run"
    assert not failures, "\n".join(failures)


def test_save_at_2x2_reshard_to_data_4_tensor_4_world_2_one_process_and_resume(tmp_path):
    """One 4-rank spawn (save, errors, loads, the resumed training of the partitioner's step), one
    2-rank spawn, then one process."""
    reports = testing.run(save_and_reshard_world_4, 4, str(tmp_path))
    full = [report.pop("losses") for report in reports][0]
    assert_all_ok(reports)
    path = tmp_path / "step-00000007"
    files = sorted(p.name for p in path.iterdir())
    # data=2 x tensor=2: ranks 0..3 each hold some block no other rank writes (tensor- and data-split)
    assert files == ["COMPLETE", "shard-00000.safetensors", "shard-00001.safetensors",
                     "shard-00002.safetensors", "shard-00003.safetensors", "sharded.json"]
    assert_all_ok(testing.run(reshard_world_2, 2, str(path)))

    assert load_under(str(path), Mesh(), STORAGE_RULES) == []  # world 1: whole tensors
    metadata, whole = sharded.load_full(path)
    expected = global_trees()
    assert metadata == {"step": 7}
    for name in expected:  # load_full rebuilds dicts and lists only: compare along the flat paths
        want, got = tree.flatten(expected[name]), tree.flatten(whole[name])
        assert sorted(got) == sorted(want), name
        for p, value in want.items():
            same = (torch.equal(got[p], value) and got[p].dtype == value.dtype) if isinstance(value, torch.Tensor) \
                else got[p] == value
            assert same, f"{name}.{p}"
    resume_one_process(str(tmp_path / "resume-00000002"), full)

    # fastllm convert: a sharded checkpoint (saved by 4 ranks) to Hugging Face, whole tensors
    assert hf.convert(tmp_path / "resume-00000002", tmp_path / "hf") == "hf"
    config, params = hf.load(tmp_path / "hf")
    _, trees = sharded.load_full(tmp_path / "resume-00000002", names=["params"])
    assert config == resume_config()
    assert mismatches({"params": params}, {"params": trees["params"]}) == []


def test_replicas_are_written_once(tmp_path):
    """A replicated tensor (spec None everywhere) goes into rank 0's file only."""
    mesh = Mesh()
    sharded.save(tmp_path / "c", {"t": {"w": torch.ones(4, 2)}}, {"t": {"w": PartitionSpec(None, None)}}, mesh)
    blocks = sharded.read_index(tmp_path / "c")["trees"]["t"]["tensors"]["w"]["blocks"]
    assert blocks == [{"file": "shard-00000.safetensors", "start": [0, 0], "shape": [4, 2]}]


def crashing_writer(path: Path, stage: str) -> None:
    """In a forked child: stop dead (no cleanup, as a SIGKILL would) once ``stage`` is reached."""
    def hook(reached):
        if reached == stage:
            os._exit(17)

    trees = {"params": {"w": torch.arange(12.0).reshape(3, 4)}}
    sharded.save(path, trees, {"params": {"w": PartitionSpec(None, None)}}, Mesh(), {"step": 2}, _hook=hook)


@pytest.mark.parametrize("stage", ["shards_written", "before_complete", "before_rename"])
def test_interrupted_save_never_looks_complete(tmp_path, stage):
    path = checkpoint.step_dir(tmp_path, 2)
    child = multiprocessing.get_context("fork").Process(target=crashing_writer, args=(path, stage))
    child.start()
    child.join(60)
    assert child.exitcode == 17
    leftovers = [p for p in tmp_path.iterdir()]
    assert [p.name for p in leftovers] == [f"{path.name}.tmp-{child.pid}"]
    assert not path.exists() and checkpoint.latest(tmp_path) is None
    if stage != "before_rename":  # before the rename the leftover is whole, but not at its name
        with pytest.raises(sharded.CheckpointError, match="incomplete"):
            sharded.load(leftovers[0], {"params": {"w": PartitionSpec(None, None)}}, Mesh())
    with pytest.raises(sharded.CheckpointError, match="does not exist"):
        sharded.load_full(path)
    assert checkpoint.prune(tmp_path, keep=1, remove_partial=True) == leftovers


# --- resume under another layout (the partitioner's sharded train step) ------------------------
RESUME_STEPS, RESUME_AT, BATCH, SEQ, LR = 4, 2, 8, 16, 3e-3


def resume_config():
    return models.preset("tiny-llama", n_kv_heads=4)  # 4 KV heads: tensor=4 splits whole heads


def resume_batches(config) -> list[dict]:
    out = []
    for step in range(RESUME_STEPS):
        gen = torch.Generator().manual_seed(50 + step)
        tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ + 1), generator=gen)
        out.append({"tokens": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()})
    return out


def rows(batch: dict, mesh: Mesh) -> dict:
    return {name: value.chunk(mesh.size("data"))[mesh.rank("data")] for name, value in batch.items()}


def sharded_run(mesh: Mesh, zero_stage: int, path: str, *, save_at: int | None, resume: bool) -> list[float]:
    """Losses of steps ``RESUME_AT..`` (resumed from ``path``) or of every step (saving at ``save_at``)."""
    from fastllm.sharding import Partitioner
    from fastllm.train.state import TrainState
    from fastllm.train.step import TrainStep

    config, opt, key = resume_config(), optim.adamw(LR, weight_decay=0.1), random.key(3)
    step = TrainStep(models.model(config), Partitioner(mesh, zero_stage=zero_stage), opt)
    plan, state = step.plan, step.init_state(key)
    specs = {"params": plan.params, "opt_state": sharded.state_specs(state.opt_state, plan.opt_state)}
    first = 0
    if resume:
        trees, metadata = sharded.load(path, specs, mesh, like={"params": state.params, "opt_state": state.opt_state})
        state, first = TrainState(trees["params"], trees["opt_state"], metadata["step"], key, None), metadata["step"]
    losses = []
    for i, batch in enumerate(resume_batches(config)[first:], start=first):
        if i == save_at:
            metadata = {"step": i, "model_config": serialize.config_to_dict(config)}
            sharded.save(path, {"params": state.params, "opt_state": state.opt_state}, specs, mesh, metadata)
        state, metrics = step(state, rows(batch, mesh))
        losses.append(float(metrics["loss"]))
    return losses


def resume_world_4(path: str) -> dict:
    """Train at data=2 x tensor=2 ZeRO-3 saving after step 2; resume at data=4 ZeRO-1 and tensor=4."""
    report = {}
    full = sharded_run(Mesh(data=2, tensor=2), 3, path, save_at=RESUME_AT, resume=False)

    def resumed(mesh, stage):
        losses = sharded_run(mesh, stage, path, save_at=None, resume=True)
        return None if close_losses(losses, full[RESUME_AT:]) else f"{losses} vs {full[RESUME_AT:]}"

    check(report, "resume at data=4 ZeRO-1", lambda: resumed(Mesh(data=4), 1))
    check(report, "resume at tensor=4", lambda: resumed(Mesh(data=1, tensor=4), 0))
    report["losses"] = full
    return report


def close_losses(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, b))


def resume_one_process(path: str, full: list[float]) -> None:
    """The plain (unsharded) train step of one process continues from the sharded checkpoint."""
    from fastllm.sharding import Partitioner
    from fastllm.train.state import TrainState
    from fastllm.train.step import TrainStep

    config, opt = resume_config(), optim.adamw(LR, weight_decay=0.1)
    params = models.init(config, random.key(0))
    template = {"params": params, "opt_state": opt.init(params)}
    replicated = {name: tree.map(lambda t: PartitionSpec(*[None] * t.ndim), value) for name, value in template.items()}
    trees, metadata = sharded.load(path, replicated, Mesh.local(), like=template)
    state = TrainState(trees["params"], trees["opt_state"], metadata["step"], random.key(3))
    step, losses = TrainStep(models.model(config), Partitioner(Mesh.local()), opt), []
    for batch in resume_batches(config)[RESUME_AT:]:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert close_losses(losses, full[RESUME_AT:]), (losses, full)
