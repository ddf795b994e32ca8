"""Every case of issue 14's training-lifecycle list, one row each, through the real ``fastllm train``:
the exit status, the one line it says, and what it leaves in the run directory.

Rows run in one driver process (cli_driver.py) unless they need a process of their own: a signal
(``signal`` rows) or torchrun (``torchrun`` rows). ``base`` is a run of 6 steps stopped after step 4
(checkpoints at 2 and 4); ``reference`` the same run done in one go.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

from cli_world import run_commands, snapshot
from lifecycle_world import (Launch, assert_same_state, build_dataset, checkpoint_steps, logged_steps, resumed_from,
                             run, train_command, training, wait_for, write_recipe)

SHARD, INDEX = "shard-00000.safetensors", "sharded.json"


# --- damage done to checkpoints/step-00000004 ----------------------------------------------------
def _truncate(ck: Path) -> None:
    data = (ck / SHARD).read_bytes()
    (ck / SHARD).write_bytes(data[: len(data) // 2])


def _flip_a_bit(ck: Path) -> None:
    data = bytearray((ck / SHARD).read_bytes())
    data[len(data) // 2] ^= 0x10
    (ck / SHARD).write_bytes(bytes(data))


def _index_without_step(ck: Path) -> None:
    """Metadata that parses and matches its manifest, but says no step (a foreign or buggy writer)."""
    index = json.loads((ck / INDEX).read_text())
    del index["metadata"]["step"]
    (ck / INDEX).write_text(json.dumps(index))
    manifest = json.loads((ck / "COMPLETE").read_text())
    data = (ck / INDEX).read_bytes()
    manifest["files"][INDEX] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ck / "COMPLETE").write_text(json.dumps(manifest))


DAMAGE = {  # kind: (damage, what the skip or the refusal says)
    "truncated": (_truncate, f"file {SHARD} has"),
    "a missing file": (lambda ck: (ck / SHARD).unlink(), f"file {SHARD} listed in COMPLETE is missing"),
    "no COMPLETE": (lambda ck: (ck / "COMPLETE").unlink(), "incomplete: no COMPLETE marker"),
    "junk metadata": (lambda ck: (ck / INDEX).write_text("{not json"), f"file {INDEX} has 9 bytes, expected"),
    "metadata without a step": (_index_without_step, "broken metadata (KeyError: 'step')"),
    "a flipped bit": (_flip_a_bit, f"file {SHARD} fails its sha256 checksum (corrupted)"),
}


@dataclass
class Row:
    name: str
    source: Optional[str] = "base"  # the run the row starts from (a copy), or None: a fresh directory
    prepare: Callable[[Path], None] = lambda run_dir: None
    overrides: tuple = ()
    recipe: str = "plain"
    runner: str = "driver"  # "signal": its own process, signalled; "torchrun": 2 ranks
    signals: tuple = ()  # (when, signal), ... for "signal" rows; when: logged lines, "started" or seconds later
    code: int = 0
    says: str = ""  # in the one line on stderr (code != 0, or a stop), else in stdout
    check: Callable = lambda world, run_dir, row: None
    snapshot: dict = field(default_factory=dict)  # of the run directory once prepared
    said: str = ""  # the run's one line
    output: str = ""
    result: dict = field(default_factory=dict)


def _damaged(kind: str, older: bool) -> Callable[[Path], None]:
    def prepare(run_dir: Path) -> None:
        checkpoints = run_dir / "checkpoints"
        if not older:
            shutil.rmtree(checkpoints / "step-00000002")
        DAMAGE[kind][0](checkpoints / "step-00000004")
    return prepare


def _same_as_reference(world, run_dir, row) -> None:
    assert training(run_dir) == training(world.reference)
    assert_same_state(run_dir, world.reference)


def _fell_back(world, run_dir, row) -> None:
    _same_as_reference(world, run_dir, row)
    kept = run_dir / "checkpoints" / "step-00000004.damaged-1"
    before = {Path(k).name: v for k, v in row.snapshot.items() if "/step-00000004/" in k}
    assert {Path(k).name: v for k, v in snapshot([kept]).items()} == before  # kept as it was, not deleted


def _unchanged(world, run_dir, row) -> None:
    assert snapshot([run_dir]) == row.snapshot  # metrics.jsonl and the damaged checkpoint included


def _reported_final_metrics(world, run_dir, row) -> None:
    def kept(files: dict) -> dict:  # config.json names this copy's run.dir
        return {k: v for k, v in files.items() if not k.endswith("config.json")}

    assert kept(snapshot([run_dir])) == kept(row.snapshot)
    assert f"step 6: loss {training(world.reference)[-1][1]:.4f}" in row.output


def _nan_logged(world, run_dir, row) -> None:
    from fastllm.train.metrics import read_metrics

    records = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
    assert records[3]["skipped"] == 1 and records[3]["loss"] != records[3]["loss"]  # NaN
    assert sorted(records) == [1, 2, 3, 4, 5, 6]


def _time_checkpoints(world, run_dir, row) -> None:
    from fastllm.train.config import TrainSection

    assert TrainSection().checkpoint_minutes > 0  # on by default
    assert checkpoint_steps(run_dir) == [5, 6]  # the clock saved after every step; 2 kept


def _signal_saved(world, run_dir, row) -> None:
    """The stop's checkpoint is where the line says; the same command resumes there, bitwise."""
    saved = checkpoint_steps(run_dir)
    assert len(saved) == 1 and 0 < saved[0] < 6 and f"after step {saved[0]};" in row.said
    assert f"checkpoint saved to {run_dir / 'checkpoints' / f'step-{saved[0]:08d}'} (run the same command" in row.said
    again = run(train_command(world.recipes["plain"], run_dir, *row.overrides))
    assert again.returncode == 0 and resumed_from(again.stdout) == saved, again.stderr[-2000:]
    _same_as_reference(world, run_dir, row)


def _aborted_at_once(world, run_dir, row) -> None:
    assert row.result["after_last_signal"] < 5.0  # before_train would sleep 30 s more
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


def _one_request(world, run_dir, row) -> None:
    assert checkpoint_steps(run_dir) == [1]  # the run went on into its first step, then saved


def _rank_zero_said_it(world, run_dir, row) -> None:
    assert "exitcode  : 2" in row.output  # every rank exits 2; torchrun itself says 1
    assert "fastllm/" not in row.output and not (run_dir / "checkpoints").exists()


def _clean_exit(world, run_dir, row) -> None:
    assert "terminate called" not in row.output and "Traceback" not in row.output
    assert "FAILED" not in row.output and len(training(run_dir)) == 4


def _rows() -> list[Row]:
    rows = [
        Row("a finished run run again reports its final metrics (quickstart: 'step 900: loss nan')",
            source="reference", says="is already trained to step 6", check=_reported_final_metrics),
        Row("a NaN loss is skipped and said (it trained on, then crashed formatting the metric)", source=None,
            recipe="nan at 3", says="step 3: 1 update(s) skipped for a non-finite loss or gradient", check=_nan_logged),
        Row("non-finite steps in a row stop the run", source=None, recipe="nan from 3",
            overrides=("train.max_bad_steps=3",), code=1,
            says="error: stopped at step 5: 3 steps in a row had a non-finite loss or gradient "
                 "(train.max_bad_steps=3); no update after step 2 was applied; the newest checkpoint is "),
        Row("checkpoints by time, on by default (checkpoint_every=0 lost every step)", source=None,
            overrides=("train.checkpoint_every=0", "train.checkpoint_minutes=0.000001"), check=_time_checkpoints),
        Row("SIGTERM: finish the step, save, exit 0 (it exited at once, unsaved)", source=None, runner="signal",
            recipe="slow", overrides=("train.checkpoint_every=0",), signals=((2, signal.SIGTERM),),
            says="fastllm train: stopped by SIGTERM after step", check=_signal_saved),
        Row("Ctrl-C: finish the step, save, exit 130 (a long traceback, unsaved)", source=None, runner="signal",
            recipe="slow", overrides=("train.checkpoint_every=0",), signals=((2, signal.SIGINT),), code=130,
            says="fastllm train: stopped by SIGINT after step", check=_signal_saved),
        Row("a second signal aborts at once", source=None, runner="signal", recipe="sleepy",
            signals=(("started", signal.SIGTERM), (1.5, signal.SIGTERM)), code=-signal.SIGTERM,
            check=_aborted_at_once),
        Row("the same signal twice within a second (terminal and torchrun) is one request", source=None,
            runner="signal", recipe="sleepy short", signals=(("started", signal.SIGINT), (0.05, signal.SIGINT)),
            code=130, says="fastllm train: stopped by SIGINT after step 1;", check=_one_request),
        Row("torchrun: every rank exits 0 (SIGABRT: no rank destroyed its process group)", source=None,
            runner="torchrun", overrides=("train.steps=4",), says="step 4: loss", check=_clean_exit),
        Row("torchrun, bad input: one line from rank 0, the other ranks silent, no traceback", source=None,
            runner="torchrun", overrides=("train.batch_size=1",), code=1,
            says="fastllm train: error: train.batch_size: 1 sequences do not split over mesh.data=2 ranks",
            check=_rank_zero_said_it),
    ]
    for kind, (_, reason) in DAMAGE.items():
        rows.append(Row(f"{kind}, an older checkpoint: resumed from it, said, kept (it fell back silently)",
                        prepare=_damaged(kind, older=True), says=f"skipped checkpoint step-00000004: {reason}",
                        check=_fell_back))
        rows.append(Row(f"{kind}, no older checkpoint: refused, nothing changed (it restarted from step 0, "
                        "overwrote metrics.jsonl, deleted the checkpoint)", prepare=_damaged(kind, older=False),
                        code=2, says=f"no checkpoint verifies (step-00000004: {reason}", check=_unchanged))
    return rows


@dataclass
class World:
    root: Path
    recipes: dict
    base: Path
    reference: Path
    scratch: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from fastllm.config import load_recipe
    from fastllm.train.trainer import Trainer

    root = tmp_path_factory.mktemp("lifecycle")
    data = build_dataset(root / "world")
    recipes = {"plain": write_recipe(root / "plain.py", data), "nan at 3": write_recipe(root / "nan3.py", data, bad=[3]),
               "nan from 3": write_recipe(root / "nanfrom3.py", data, bad=range(3, 50)),
               "slow": write_recipe(root / "slow.py", data, step_sleep=0.3),
               "sleepy": write_recipe(root / "sleepy.py", data, sleep_before=30.0),
               "sleepy short": write_recipe(root / "sleepy_short.py", data, sleep_before=2.0)}
    reference, base = root / "reference", root / "base"
    assert run(train_command(recipes["plain"], reference)).returncode == 0
    recipe, config = load_recipe(str(recipes["plain"]), [f"run.dir={base}"])
    Trainer(config, model=recipe.model(config)).run(stop_at=4)
    (root / "scratch").mkdir()
    return World(root, recipes, base, reference, root / "scratch")


def _start(world: World, row: Row, index: int) -> Path:
    run_dir = world.root / f"row-{index}"
    if row.source is not None:
        shutil.copytree(getattr(world, row.source), run_dir)
        row.prepare(run_dir)
        row.snapshot = snapshot([run_dir])
    return run_dir


def _run_signalled(world: World, row: Row, run_dir: Path, index: int) -> dict:
    launch = Launch(train_command(world.recipes[row.recipe], run_dir, *row.overrides), world.root / f"row-{index}.log")
    try:
        for when, signum in row.signals:
            if when == "started":
                wait_for(lambda: (run_dir / "started").exists(), what="before_train")
            elif isinstance(when, float):
                time.sleep(when)
            else:
                wait_for(lambda: logged_steps(run_dir) >= when, what=f"{when} logged steps")
            launch.signal(signum)
        signalled = time.monotonic()
        code = launch.wait()
    finally:
        launch.stop()
    output = launch.output()
    said = [line for line in output.splitlines() if line.startswith("fastllm train: ")]
    return {"code": code, "stdout": output, "stderr": "\n".join(said), "after_last_signal": time.monotonic() - signalled}


def test_each_lifecycle_case_of_issue_14(world):
    rows = _rows()
    dirs = [_start(world, row, i) for i, row in enumerate(rows)]
    driven = [i for i, row in enumerate(rows) if row.runner == "driver"]
    results = dict(zip(driven, run_commands(world, [
        ["train", str(world.recipes[rows[i].recipe]), f"run.dir={dirs[i]}", *rows[i].overrides] for i in driven],
        timeout=60.0)))
    for i, row in enumerate(rows):
        if row.runner == "signal":
            results[i] = _run_signalled(world, row, dirs[i], i)
        elif row.runner == "torchrun":
            done = run(train_command(world.recipes[row.recipe], dirs[i], *row.overrides, ranks=2))
            output = done.stdout + done.stderr
            said = [line for line in output.splitlines() if line.startswith("fastllm train: ")]
            results[i] = {"code": done.returncode, "stdout": output, "stderr": "\n".join(said)}
    failures = []
    for i, row in enumerate(rows):
        result = results[i]
        lines = result["stderr"].strip().splitlines()
        row.said, row.output, row.result = (lines or [""])[0], result["stdout"] + result["stderr"], result
        where = result["stdout"] if row.code == 0 and row.runner != "signal" else row.said
        ok = result["code"] == row.code and row.says in where and "Traceback" not in result["stderr"]
        if row.code < 0:  # killed by a signal: nothing said
            ok = ok and not lines
        elif row.code != 0 or row.runner == "signal":  # one line, no more
            ok = ok and len(lines) == 1
        if not ok:
            failures.append(f"{row.name}: exit {result['code']} (expected {row.code}), expected {row.says!r}; got\n"
                            f"{result['stderr'][-1500:]}\n{result['stdout'][-1500:]}")
            continue
        try:
            row.check(world, dirs[i], row)
        except AssertionError as error:
            failures.append(f"{row.name}: {error}")
    assert not failures, "\n\n".join(failures)
