"""Writing the Trainer's checkpoints: in the training loop, or beside it.

Blocking (the default): the loop waits while every rank writes its shards and rank 0 commits.

Asynchronous (``train.async_checkpoint``): the loop waits only for a copy of the state in host
memory -- the train step donates its state, so the next step overwrites the tensors it was given
-- and a background thread writes that copy: the same atomic sharded save (temporary directory,
``COMPLETE`` last, rename), whose few collectives run over a gloo group of its own so they never
interleave with the step's, then the pruning. At most one save is in flight: the next save, and
the end of the run, wait for it; its failure is raised there. The time this saves is measured in
docs/reliability.md (``benchmarks/async_checkpoint.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from torch import Tensor

from fastllm import tree
from fastllm.train.state import TrainState

__all__ = ["CheckpointWriter", "host_copy"]

Write = Callable[[TrainState, dict, Any], Path]  # (state, extra, collective group) -> written path


def host_copy(state: TrainState) -> TrainState:
    """The state's tensors copied to host memory (the step may overwrite the originals)."""

    def copy(values: Any) -> Any:
        return tree.map(lambda t: t.detach().to("cpu", copy=True) if isinstance(t, Tensor) else t, values)

    loss_scale = None if state.loss_scale is None else copy(state.loss_scale)
    return state._replace(params=copy(state.params), opt_state=copy(state.opt_state), loss_scale=loss_scale)


class CheckpointWriter:
    """``save(state, extra)``; ``asynchronous``: write in a thread, over ``group`` (module docstring)."""

    def __init__(self, write: Write, *, asynchronous: bool = False, group: Any = None):
        self.write, self.asynchronous, self.group = write, asynchronous, group
        self.last: Optional[Path] = None  # the newest checkpoint this writer finished
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def save(self, state: TrainState, extra: dict) -> None:
        self.wait()
        if not self.asynchronous:
            self.last = self.write(state, extra, None)
            return
        snapshot = host_copy(state)
        self._thread = threading.Thread(target=self._run, args=(snapshot, extra), name="fastllm-checkpoint",
                                        daemon=True)
        self._thread.start()

    def _run(self, state: TrainState, extra: dict) -> None:
        try:
            self.last = self.write(state, extra, self.group)
        except BaseException as error:  # noqa: BLE001 - raised in the training loop by wait()
            self._error = error

    def wait(self) -> Optional[Path]:
        """Wait for the save in flight; raise its error; the newest finished checkpoint."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self.last

    def close(self, *, clean: bool = True) -> None:
        """Wait for the save in flight (after a failure too: a half-written save must not be cut
        off by the process group going away under it); raise its error only when ``clean``."""
        try:
            self.wait()
        except BaseException:
            if clean:
                raise
