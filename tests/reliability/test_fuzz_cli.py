"""Property: any bad ``fastllm`` command line ends in one short error line and exit status 2, within a
time limit, and changes nothing that existed before (the trained run, the dataset, the models).

Hypothesis draws batches of bad command lines (fuzz_cases.py: bad overrides and recipes, bad
files of every kind, bad flags); each batch runs in one driver subprocess. ``derandomize`` makes
the run the same on every machine; a failure lists every command line of its batch that misbehaved.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cli_world import World, run_commands, snapshot
from fuzz_cases import MARKERS, Case, any_case

BATCH, BATCHES = 110, 3  # 330 command lines in 3 processes (each start costs about 2 s)
MAX_MESSAGE = 1000


def _markers(world: World, case_dir: Path) -> dict[str, str]:
    paths = {"@RUN@": world.run, "@STEP@": world.one_process, "@SHARDED@": world.sharded,
             "@FASTLLM@": world.fastllm_dir, "@HF@": world.hf_dir, "@DATA@": world.dataset,
             "@TOKENIZER@": world.tokenizer, "@OTHER_TOKENIZER@": world.other_tokenizer, "@CORPUS@": world.corpus,
             "@RECIPE@": world.recipe, "@D@": case_dir}
    paths.update({f"@BAD:{name}@": path for name, path in world.bad_datasets.items()})
    assert set(MARKERS) <= set(paths)
    return {marker: str(path) for marker, path in paths.items()}


def _edit(file: Path, change) -> None:
    """Apply one file change of a case: new bytes, deletion, a cut, or a manifest field set."""
    if change is None:
        file.unlink()
    elif isinstance(change, bytes):
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(change)
    elif change[0] == "cut":  # always strictly shorter
        data = file.read_bytes()
        file.write_bytes(data[:change[1] % len(data)])
    else:
        _, field, value = change
        manifest = json.loads(file.read_text())
        (manifest["shards"][0] if field == "max_id" else manifest["tokenizer"])[field] = value
        file.write_text(json.dumps(manifest))


def _materialize(world: World, case: Case, case_dir: Path) -> list[str]:
    case_dir.mkdir(parents=True)
    markers = _markers(world, case_dir)
    for source, target in case.copies:
        shutil.copytree(markers[source], case_dir / target)
    for name, change in case.files:
        _edit(case_dir / name, change)
    argv = []
    for arg in case.argv:
        for marker, path in markers.items():
            arg = arg.replace(marker, path)
        argv.append(arg)
    return argv


def _problem(case: Case, argv: list[str], result: dict) -> str | None:
    err = result["stderr"]
    lines = err.strip().splitlines()
    if result["code"] == 2 and 1 <= len(lines) <= 2 and "Traceback" not in err and len(err) <= MAX_MESSAGE \
            and lines[-1].startswith("fastllm") and "error: " in lines[-1]:
        return None
    return f"[{case.kind}] {argv}\n  exit {result['code']} after {result['seconds']} s; stderr:\n{err[-2000:]}"


def _run_batch(world: World, cases: list[Case], batch_dir: Path) -> None:
    argvs = [_materialize(world, case, batch_dir / f"c{i}") for i, case in enumerate(cases)]
    before, names = snapshot(world.protected()), sorted(p.name for p in world.root.iterdir())
    results = run_commands(world, argvs)
    problems = [p for case, argv, result in zip(cases, argvs, results) if (p := _problem(case, argv, result))]
    assert not problems, f"{len(problems)} of {len(cases)} bad command lines misbehaved:\n\n" + "\n\n".join(problems)
    assert snapshot(world.protected()) == before, "a bad command changed the world"
    assert sorted(p.name for p in world.root.iterdir()) == names, "a bad command left something beside the world"


def test_bad_command_lines_fail_cleanly(world):
    ran = []

    # No shrinking: a batch costs a process start, and a failure already lists every bad case in it.
    @settings(max_examples=BATCHES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(st.lists(any_case(), min_size=BATCH, max_size=BATCH, unique=True))
    def check(cases):
        batch_dir = world.scratch / f"fuzz-{len(ran)}"
        ran.extend(cases)
        _run_batch(world, cases, batch_dir)
        shutil.rmtree(batch_dir)

    check()
    assert len(set(ran)) >= 300, f"only {len(set(ran))} distinct bad command lines ran"
    kinds = {case.kind for case in ran}
    assert kinds == {"override", "recipe", "prepare", "convert", "generate", "train-data"}, kinds
