"""The GPU suite in one command: every check of tests/gpu, each isolated, then a pass/fail table.

    python tests/gpu/run.py                    # all of it; exit status 1 unless all passed or skipped
    python tests/gpu/run.py --list             # the checks, without running them (works on CPU)
    python tests/gpu/run.py --only attention   # the checks whose id contains any of the words
    python tests/gpu/run.py --dry-run          # on the CPU, kernels interpreted: the suite's own code

Each test file runs in a pytest process of its own, with ``TRITON_INTERPRET=0`` (compiled kernels)
and ``FASTLLM_TYPECHECK=0`` (what torch.compile needs) set before anything imports Triton or
fastllm. Tests report as they finish (tests/gpu/conftest.py's events), so when a process dies or a
test outlives ``--test-timeout-s``, that test is marked crashed or timeout and the file's remaining
tests run again in a fresh process: one failure never stops the others. Checks that cannot start
within ``--budget-s`` (one device call is 10 minutes) are listed as not run; rerun them with --only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# cheap and most telling first, the NCCL runs (minutes, several GPUs) last; other test files after these
ORDER = ["test_kernels_gpu.py", "test_attention_gpu.py", "test_model_gpu.py", "test_compile_gpu.py",
         "test_distributed_gpu.py"]
# NVLink multicast can take a shared host's GPUs out of service: off unless the machine says otherwise
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclasses.dataclass
class Row:
    check: str
    status: str  # passed | failed | skipped | crashed | timeout | error | not run
    seconds: float = 0.0
    note: str = ""


def environment(dry_run: bool) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1" if dry_run else "0", FASTLLM_TYPECHECK="0",
               FASTLLM_GPU_DRY_RUN="1" if dry_run else "0", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    for name, value in MULTICAST_OFF.items():
        env.setdefault(name, value)
    return env


def pytest_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header", *args]


def collect(env: dict, only: list[str]) -> dict[str, list[str]]:
    """{file: node ids} of the suite, in ORDER, filtered by ``only``."""
    rank = {name: i for i, name in enumerate(ORDER)}
    names = sorted((p.name for p in HERE.glob("test_*.py")), key=lambda name: (rank.get(name, len(ORDER)), name))
    files = [str(HERE.relative_to(ROOT) / name) for name in names]
    result = subprocess.run(pytest_command("--collect-only", *files), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    ids = [line.strip() for line in result.stdout.splitlines() if "::" in line]
    if result.returncode != 0 or not ids:
        output = (result.stdout + result.stderr)[-4000:]
        sys.exit(f"collecting tests/gpu failed (exit {result.returncode}):\n{output}")
    ids = [i for i in ids if not only or any(word in i for word in only)]
    return {f: [i for i in ids if i.startswith(f + "::")] for f in files if any(i.startswith(f + "::") for i in ids)}


def _read_events(path: Path, offset: int) -> tuple[list[dict], int]:
    with open(path) as f:
        f.seek(offset)
        text = f.read()
    complete = text[:text.rfind("\n") + 1]  # a line being written is read next time
    return [json.loads(line) for line in complete.splitlines() if line], offset + len(complete)


def _watch(process: subprocess.Popen, events: Path, deadline: float, test_timeout: float):
    """Follow the events until the process ends, or kill it and its children (torchrun's ranks) once
    the running test outlives ``test_timeout`` or the budget is spent: (rows, the test it was in,
    when that test started, "timeout" | "budget" | "")."""
    rows, current, started, offset = {}, None, time.monotonic(), 0
    while True:
        finished = process.poll() is not None
        new, offset = _read_events(events, offset)
        for event in new:
            if event["event"] == "start":
                current, started = event["nodeid"], time.monotonic()
            else:
                rows[event["nodeid"]] = Row(event["nodeid"], event["outcome"], event["seconds"], event["note"])
                current = None
        now = time.monotonic()
        why = "timeout" if current and now - started > test_timeout else "budget" if now > deadline else ""
        if finished or why:
            if why:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            return rows, current, started, why
        time.sleep(0.5)


def run_once(ids: list[str], env: dict, deadline: float, test_timeout: float) -> tuple[dict, Row | None, str]:
    """Run ``ids`` in one pytest process: ({id: Row} reported, a Row for the test it stopped in (if
    it stopped in one), why it stopped: "timeout", "budget", or the exit status and the last line)."""
    with tempfile.TemporaryDirectory() as tmp:
        events, log = Path(tmp) / "events.jsonl", Path(tmp) / "log.txt"
        events.touch()
        with open(log, "w") as out:
            process = subprocess.Popen(pytest_command(*ids), cwd=ROOT, env=dict(env, FASTLLM_GPU_EVENTS=str(events)),
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            rows, current, started, why = _watch(process, events, deadline, test_timeout)
        lines = log.read_text().strip().splitlines() or [""]
    # a segfault, say (after pytest's progress dots on the same line)
    fatal = [line[line.index("Fatal Python error"):] for line in lines if "Fatal Python error" in line]
    why = why or f"exit {process.returncode}: {(fatal or lines)[-1]}"
    if current is None:
        return rows, None, why
    notes = {"timeout": "over --test-timeout-s", "budget": "--budget-s spent"}
    stopped = Row(current, "timeout" if why in notes else "crashed", round(time.monotonic() - started, 1),
                  notes.get(why, f"the process died: {why}")[:300])
    return rows, stopped, why


def run_file(ids: list[str], env: dict, deadline: float, test_timeout: float) -> list[Row]:
    """Every id of one file; a fresh process after each crash or hang, until all have a row."""
    rows, pending = {}, list(ids)
    while pending:
        if time.monotonic() > deadline:
            rows.update({i: Row(i, "not run", note="--budget-s spent before it started") for i in pending})
            break
        reported, stopped, why = run_once(pending, env, deadline, test_timeout)
        rows.update(reported)
        if stopped is not None:
            rows[stopped.check] = stopped
        left = [i for i in pending if i not in rows]
        if left and not reported and stopped is None:  # nothing started: an import error, say
            status = "not run" if why == "budget" else "error"
            rows.update({i: Row(i, status, note=why[-300:]) for i in left})
            break
        pending = left
    return [rows[i] for i in ids]


def describe_machine() -> str:
    try:
        import torch
        import triton

        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"torch {torch.__version__}, triton {triton.__version__}, GPUs: {names or 'none'}"
    except Exception as error:  # the table matters more than this line
        return f"(versions unavailable: {error})"


def table(rows: list[Row]) -> str:
    width = max(len(r.check) for r in rows)
    lines = [f"{'check':<{width}}  {'status':<8} {'seconds':>7}  note", "-" * (width + 30)]
    for r in rows:
        lines.append(f"{r.check:<{width}}  {r.status:<8} {r.seconds:>7.1f}  {r.note[:160]}")
    counts = {s: sum(r.status == s for r in rows) for s in dict.fromkeys(r.status for r in rows)}
    lines.append("gpu suite: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument("--only", nargs="+", default=[], help="run the checks whose id contains any of these")
    parser.add_argument("--dry-run", action="store_true", help="run on the CPU, kernels interpreted")
    parser.add_argument("--budget-s", type=float, default=540.0, help="start no check after this many seconds")
    parser.add_argument("--test-timeout-s", type=float, default=300.0, help="kill a check that runs longer")
    parser.add_argument("--json", type=Path, help="also write the rows here as JSON")
    args = parser.parse_args()
    started = time.monotonic()
    env = environment(args.dry_run)
    files = collect(env, args.only)
    if not files:
        sys.exit(f"no check matches --only {' '.join(args.only)}")
    if args.list:
        print("\n".join(i.removeprefix("tests/gpu/") for ids in files.values() for i in ids))
        print(f"{sum(map(len, files.values()))} checks")
        return 0
    print(describe_machine() + (" (dry run on the CPU)" if args.dry_run else ""), flush=True)
    rows = []
    for ids in files.values():
        for row in run_file(ids, env, started + args.budget_s, args.test_timeout_s):
            row.check = row.check.removeprefix("tests/gpu/")
            print(f"{row.status:<8} {row.seconds:7.1f}s  {row.check}", flush=True)
            rows.append(row)
    print("\n" + table(rows))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    return 0 if all(r.status in ("passed", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
