"""Safety: nothing fastllm reads can run code (safetensors and JSON only: no pickle, no
``torch.load`` without ``weights_only=True``, no ``trust_remote_code``), and the commands write
nowhere but where they are told to (training: only ``run.dir``)."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from cli_world import World, run_commands, snapshot

ROOT = Path(__file__).parents[2]
SOURCES = sorted((ROOT / "fastllm").rglob("*.py")) + sorted((ROOT / "recipes").glob("*.py"))
_UNSAFE_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib"}


def _keyword(call: ast.Call, name: str):
    found = [k.value for k in call.keywords if k.arg == name]
    return found[0].value if found and isinstance(found[0], ast.Constant) else (None if not found else "dynamic")


def _attribute(call: ast.Call) -> str:
    func = call.func
    base = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
    return f"{base}.{func.attr}" if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def unsafe_calls(source: str, filename: str) -> list[str]:
    """Where ``source`` could load a pickle or run code from a checkpoint or tokenizer."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in _UNSAFE_MODULES for a in node.names):
            found.append(f"{where}: imports {[a.name for a in node.names]}")
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _UNSAFE_MODULES:
            found.append(f"{where}: imports from {node.module}")
        if not isinstance(node, ast.Call):
            continue
        name = _attribute(node)
        if name == "torch.load" and _keyword(node, "weights_only") is not True:
            found.append(f"{where}: torch.load without weights_only=True")
        if name.endswith("from_pretrained") and _keyword(node, "trust_remote_code") is not False:
            found.append(f"{where}: from_pretrained without trust_remote_code=False")
        if _keyword(node, "trust_remote_code") is True or _keyword(node, "allow_pickle") is True:
            found.append(f"{where}: trust_remote_code/allow_pickle=True")
    return found


def test_no_pickle_torch_load_or_remote_code_in_the_sources():
    problems = [p for file in SOURCES for p in unsafe_calls(file.read_text(), str(file.relative_to(ROOT)))]
    assert not problems, "\n".join(problems)


def test_the_audit_finds_what_it_looks_for():
    """The checker itself: each pattern it must refuse is refused."""
    for bad in ("import pickle", "from pickle import loads", "torch.load(f)", "torch.load(f, weights_only=False)",
                "AutoTokenizer.from_pretrained(d)", "AutoModel.from_pretrained(d, trust_remote_code=True)",
                "np.load(f, allow_pickle=True)"):
        assert unsafe_calls(bad, "x.py"), bad
    assert not unsafe_calls("torch.load(f, weights_only=True)\nT.from_pretrained(d, trust_remote_code=False)", "x")


def _changed(before: dict, after: dict) -> set[str]:
    return {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}


def test_commands_write_only_where_told(world: World, tmp_path):
    """Train (with export and a sample), prepare, convert and generate, run from an empty working
    directory: every file they create or change lies under run.dir, --output or the destination."""
    run_dir, out, dst, cwd = tmp_path / "run", tmp_path / "prepared", tmp_path / "converted", tmp_path / "cwd"
    shutil.copytree(world.run, run_dir)  # resume a trained run, then train two steps more
    recipe = tmp_path / "recipes" / "recipe.py"  # never imported before: a bytecode cache would show
    recipe.parent.mkdir()
    shutil.copyfile(world.recipe, recipe)
    cwd.mkdir()
    watched = [world.root, tmp_path]
    before = snapshot(watched)
    results = run_commands(world, [
        ["train", str(recipe), f"run.dir={run_dir}", "train.steps=4", "run.export_hf=true",
         "sample.prompt=w1 w2", "sample.max_new_tokens=3"],
        ["prepare", str(world.corpus), "--tokenizer", str(world.tokenizer), "--output", str(out), "--workers", "1",
         "--quiet"],
        ["convert", str(run_dir), str(dst)],
        ["generate", str(dst), "--prompt", "w1", "--max-new-tokens", "2"],
    ], cwd=cwd)
    assert [r["code"] for r in results] == [0, 0, 0, 0], [r["stderr"][-800:] for r in results]
    changed = _changed(before, snapshot(watched))
    outside = sorted(p for p in changed if not any(p.startswith(f"{d}/") for d in (run_dir, out, dst)))
    assert not outside, f"written outside run.dir / --output / the destination: {outside}"
    assert any(p.startswith(f"{run_dir}/hf/") for p in changed) and any(p.startswith(f"{dst}/") for p in changed)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "a staging directory was left behind"
    assert sorted(p.name for p in recipe.parent.iterdir()) == ["recipe.py"]
