"""Run a function in N spawned CPU processes joined by gloo: distributed tests without GPUs.

``run(fn, world_size, *args)`` starts ``world_size`` fresh interpreters (``spawn``), sets torchrun's
environment variables in each (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT`` on a free port), initialises a gloo process group, calls ``fn(*args)`` and returns
the list of per-rank results (which must pickle). A rank that raises fails the whole run with its
traceback; a rank that hangs or dies fails it after ``timeout_s`` instead of hanging CI.

``fn`` must be importable by name from a fresh interpreter (a module-level function).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from collections.abc import Callable
from typing import Any

__all__ = ["run", "free_port", "DistributedTestError"]


class DistributedTestError(RuntimeError):
    """A rank raised, died or timed out; the message holds its rank and traceback."""


def free_port() -> int:
    """A TCP port that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, results, timeout_s: float) -> None:
    try:
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
        try:
            value = fn(*args)
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", value))
    except BaseException:  # noqa: BLE001 - report everything, including KeyboardInterrupt
        results.put((rank, "error", traceback.format_exc()))


def run(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """``[fn(*args) on rank 0, ..., on rank world_size - 1]``, each in its own gloo process."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_worker, args=(rank, world_size, port, fn, args, results, timeout_s), daemon=True
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    try:
        return _collect(processes, results, world_size, time.monotonic() + timeout_s)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.kill()


def _collect(processes, results, world_size: int, deadline: float) -> list[Any]:
    values: dict[int, Any] = {}
    dead_since: float | None = None
    while len(values) < world_size:
        try:
            rank, status, value = results.get(timeout=0.2)
        except queue.Empty:
            dead = [r for r, p in enumerate(processes) if r not in values and p.exitcode is not None]
            # A rank that exited may still have its result in the pipe: give it a moment.
            dead_since = (dead_since or time.monotonic()) if dead else None
            if dead and time.monotonic() - dead_since > 2.0:
                codes = {r: processes[r].exitcode for r in dead}
                raise DistributedTestError(f"ranks {dead} exited (codes {codes}) without a result")
            if time.monotonic() > deadline:
                missing = [r for r in range(world_size) if r not in values]
                raise DistributedTestError(f"ranks {missing} did not finish within the timeout (hung?)")
            continue
        if status == "error":
            raise DistributedTestError(f"rank {rank} of {world_size} raised:\n{value}")
        values[rank] = value
    return [values[rank] for rank in range(world_size)]
