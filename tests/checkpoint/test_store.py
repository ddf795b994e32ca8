"""Round trips, run-directory bookkeeping, and rejection of incomplete or corrupt checkpoints."""

import json

import pytest
import torch

from fastllm import checkpoint, optim, tree


def make_params():
    gen = torch.Generator().manual_seed(0)
    layer = lambda: {"attention": {"wq": torch.randn(2, 3, 4, generator=gen)},  # noqa: E731
                     "mlp_norm": {"scale": torch.randn(4, generator=gen).to(torch.bfloat16)}}
    return {"embed": {"tokens": torch.randn(7, 4, generator=gen).to(torch.bfloat16)},
            "layers": [layer(), layer(), layer()]}


def make_trees():
    params = make_params()
    opt = optim.adamw(1e-3, max_grad_norm=1.0)
    opt_state = opt.init(params)
    grads = tree.map(lambda p: torch.ones_like(p), params)
    _, opt_state = opt.update(grads, opt_state, params)  # non-zero moments, count 1
    scaler = optim.dynamic_loss_scale(initial=1024.0, growth_interval=7)
    extra = {"step": 12, "lr": 0.5, "finished": False, "name": "run-a", "seen": torch.tensor(3)}
    return {"params": params, "opt_state": opt_state, "scaler": scaler, "extra": extra}


def assert_same(a, b):
    flat_a, flat_b = tree.flatten(a), tree.flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for name, x in flat_a.items():
        y = flat_b[name]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), name
        else:
            assert type(x) is type(y) and x == y, name


def test_round_trip_without_template_keeps_lists_dtypes_and_scalars(tmp_path):
    trees = make_trees()
    checkpoint.save(tmp_path / "ck", trees, {"step": 12, "config": {"lr": 1e-3}})
    loaded, metadata = checkpoint.load(tmp_path / "ck")
    assert metadata == {"step": 12, "config": {"lr": 1e-3}}
    assert isinstance(loaded["params"]["layers"], list) and len(loaded["params"]["layers"]) == 3
    assert loaded["params"]["embed"]["tokens"].dtype == torch.bfloat16
    assert_same(loaded["params"], trees["params"])
    assert_same(loaded["extra"], trees["extra"])
    assert loaded["scaler"][2] == 7 and isinstance(loaded["scaler"][2], int)  # NamedTuple -> list


def test_round_trip_with_template_restores_named_tuples(tmp_path):
    trees = make_trees()
    checkpoint.save(tmp_path / "ck", trees)
    template = {"opt_state": optim.adamw(1e-3, max_grad_norm=1.0).init(make_params()),
                "scaler": optim.dynamic_loss_scale()}
    loaded, _ = checkpoint.load(tmp_path / "ck", like=template, names=["opt_state", "scaler"])
    assert set(loaded) == {"opt_state", "scaler"}
    adam = optim.get_state(loaded["opt_state"], optim.ScaleByAdamState)
    assert adam.count.item() == 1 and adam.count.dtype == torch.int64
    assert_same(loaded["opt_state"], trees["opt_state"])
    assert type(loaded["scaler"]) is optim.LossScale and loaded["scaler"][2:] == trees["scaler"][2:]
    assert loaded["scaler"].scale.item() == 1024.0


def test_template_mismatch_names_the_path(tmp_path):
    checkpoint.save(tmp_path / "ck", {"params": make_params()})
    wrong = make_params()
    wrong["layers"][1]["attention"]["wq"] = torch.zeros(2, 3, 5)
    with pytest.raises(checkpoint.CheckpointError, match=r"layers\.1\.attention\.wq"):
        checkpoint.load(tmp_path / "ck", like={"params": wrong})
    wrong = make_params()
    wrong["lm_head"] = torch.zeros(7, 4)
    with pytest.raises(checkpoint.CheckpointError, match="missing.*lm_head"):
        checkpoint.load(tmp_path / "ck", like={"params": wrong})


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="tree name"):
        checkpoint.save(tmp_path / "a", {"bad/name": {}})
    with pytest.raises(TypeError, match="'w'.*object"):
        checkpoint.save(tmp_path / "b", {"params": {"w": object()}})
    with pytest.raises(TypeError, match="JSON"):
        checkpoint.save(tmp_path / "c", {}, {"x": object()})
    assert list(tmp_path.iterdir()) == []  # failed saves leave nothing behind
    checkpoint.save(tmp_path / "d", {"params": make_params()})
    with pytest.raises(FileExistsError, match="overwrite"):
        checkpoint.save(tmp_path / "d", {"params": make_params()})
    checkpoint.save(tmp_path / "d", {"params": {"w": torch.ones(1)}}, overwrite=True)
    assert set(checkpoint.load(tmp_path / "d")[0]["params"]) == {"w"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_latest_skips_incomplete_and_prune_keeps_newest(tmp_path):
    for step in (5, 10, 20):
        checkpoint.save(checkpoint.step_dir(tmp_path, step), {"p": {"w": torch.full((2,), step)}})
    (tmp_path / "step-00000030.tmp-999").mkdir()  # a crashed writer's leftover
    (tmp_path / "step-00000040").mkdir()  # a directory without a COMPLETE marker
    assert checkpoint.latest(tmp_path) == checkpoint.step_dir(tmp_path, 20)
    assert checkpoint.step_of(checkpoint.latest(tmp_path)) == 20
    removed = checkpoint.prune(tmp_path, keep=2)
    assert removed == [checkpoint.step_dir(tmp_path, 5)]
    assert [checkpoint.step_of(p) for p in checkpoint.checkpoints(tmp_path)] == [10, 20]
    checkpoint.prune(tmp_path, keep=2, remove_partial=True)  # a damaged checkpoint is never deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000010", "step-00000020", "step-00000040"]
    assert checkpoint.latest(tmp_path / "nothing-here") is None


@pytest.fixture
def saved(tmp_path):
    path = checkpoint.save(tmp_path / "ck", {"params": make_params()}, {"step": 1})
    return path, path / "params.safetensors"


def test_missing_marker_is_rejected(saved):
    path, _ = saved
    (path / "COMPLETE").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"ck is incomplete: no COMPLETE"):
        checkpoint.load(path)
    assert checkpoint.latest(path.parent) is None


def test_truncated_file_is_rejected(saved):
    path, file = saved
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match=r"params\.safetensors has \d+ bytes.*truncated"):
        checkpoint.load(path)
    assert not checkpoint.is_complete(path)


def test_corrupted_file_is_rejected(saved):
    path, file = saved
    data = bytearray(file.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the tensor data, size unchanged
    file.write_bytes(bytes(data))
    assert checkpoint.is_complete(path)  # sizes match: only the checksum can tell
    with pytest.raises(checkpoint.CheckpointError, match=r"params\.safetensors fails its sha256"):
        checkpoint.load(path)


def test_missing_file_and_garbled_marker_are_rejected(saved):
    path, file = saved
    file.unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"params\.safetensors listed in COMPLETE is missing"):
        checkpoint.load(path)
    (path / "COMPLETE").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read the completion manifest"):
        checkpoint.load(path)


def test_manifest_lists_every_file(saved):
    path, _ = saved
    manifest = json.loads((path / "COMPLETE").read_text())
    assert set(manifest["files"]) == {"params.safetensors", "metadata.json"}
    assert checkpoint.verify(path) == manifest
