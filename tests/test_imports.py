"""Every fastllm module imports on its own, as the first fastllm module of a process.

An import cycle only fails for some orders (the module that starts the cycle sees a partially
initialised one), so each module is imported first: one subprocess (torch imported once) drops
every ``fastllm`` module from ``sys.modules`` before importing the next, and reports the failures.
"""

import subprocess
import sys
from pathlib import Path

import fastllm

PACKAGE = Path(fastllm.__file__).parent

CHILD = """
import importlib, sys, traceback
import torch  # noqa: F401 - shared by every import below; fastllm's own modules are re-imported
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "fastllm" or m.startswith("fastllm.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ":\\n" + traceback.format_exc(limit=-3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__main__":  # runs the command line
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports_first():
    names = module_names()
    assert "fastllm.train.step" in names and "fastllm.sharding.partitioner" in names
    env = {"FASTLLM_TYPECHECK": "0", "PATH": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, *names], capture_output=True, text=True, env=env,
                          cwd=PACKAGE.parent, timeout=300)
    assert done.returncode == 0, f"modules that fail when imported first:\n{done.stdout}{done.stderr[-3000:]}"


def test_sharding_never_imports_train_or_models():
    """DESIGN.md: sharding serves train and models (they import sharding or are handed to it, never
    the reverse: the partitioner takes the models' Param declarations from its caller). Lazy
    imports inside functions count too."""
    offenders = []
    for path in sorted((PACKAGE / "sharding").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            words = line.replace(",", " ").split()
            if words[:1] not in (["import"], ["from"]) or len(words) < 2:
                continue
            for package in ("train", "models"):
                if words[1] == f"fastllm.{package}" or words[1].startswith(f"fastllm.{package}.") or (
                        words[1] == "fastllm" and package in words[2:]):
                    offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == [], offenders


def _lines(folder: str):
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            yield f"{path.relative_to(PACKAGE)}:{number}", line


def test_model_code_names_dims_and_no_parallel_layers():
    """Model code says what its tensors' dims are (fastllm.nn.ops) and nothing about how they are
    split: no hooks named after Megatron's parallel layers, no ranks, no process groups."""
    words = ("enter_parallel", "exit_parallel", "row_parallel", "column_parallel", "local_seq", "copy_to_parallel",
             "megatron", "get_rank", "process_group", "torch.distributed", "sequence_parallel")
    offenders = [f"{where}: {line.strip()}" for folder in ("nn", "models") for where, line in _lines(folder)
                 if any(word in line.lower() for word in words)]
    assert offenders == [], offenders


def test_sharding_reads_no_parameter_paths():
    """Sharding consumes the model's declarations (axes, parts); it never parses a parameter's
    dotted path or looks for a particular parameter by name."""
    patterns = ('split(".")', 'partition(".")', "rsplit(", "isdigit", '"lm_head', '"embed.', '"layers.',
                '"final_norm')
    offenders = [f"{where}: {line.strip()}" for where, line in _lines("sharding")
                 if any(pattern in line for pattern in patterns)]
    assert offenders == [], offenders
