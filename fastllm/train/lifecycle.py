"""The life of one training process, from start to exit, on every exit path.

``with Session(config) as session:`` around a run (``fastllm.train.run.train`` does it):

- **Process group.** Initialised here when torchrun started the process (``run.timeout_s`` bounds
  every collective's wait), and destroyed on every way out. A process that exits with a live gloo
  group aborts in C++ ("terminate called without an active exception", SIGABRT), which torchrun
  reports as a failed run, killing rank 0's Hugging Face export with it.
- **Stop signals.** :class:`fastllm.train.signals.StopSignals` for the whole session: the training
  loop stops at an agreed step and saves; a signal during start-up stops the run after its first
  step, one during teardown or the export is not acted on (a second one, later, aborts).
- **Peers.** Heartbeats (:mod:`fastllm.train.peers`); a collective that fails because a peer died or
  hangs becomes a :class:`PeerFailure` that names the rank, said by the lowest rank not at fault.
  Any other error is left for the others to quote (``error: ...`` in the store) and re-raised.

Exit statuses of ``fastllm train`` (``fastllm.errors.Stop`` carries the non-zero ones but 2):

======  =====================================================================================
0       trained to ``train.steps`` (a finished run run again too); stopped by SIGTERM, saved
1       a peer rank died or hangs; ``train.max_bad_steps`` non-finite steps in a row; a bug
2       bad input (one line)
130     stopped by SIGINT (Ctrl-C), saved; or interrupted before training began
======  =====================================================================================
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, TypeVar

import torch.distributed as dist

from fastllm.errors import Stop, UserError, one_line
from fastllm.sharding.mesh import init_from_env
from fastllm.train import peers as peers_module
from fastllm.train.signals import StopSignals, exit_code

__all__ = ["Session", "Stopped", "PeerFailure", "is_collective_failure", "signal_stop", "rank_zero_first"]

T = TypeVar("T")

# What gloo, NCCL and the store say when a peer is gone (they raise plain RuntimeErrors).
_COLLECTIVE_MARKERS = ("gloo", "nccl", "connection closed", "connection reset", "timed out waiting", "broken pipe")


def is_collective_failure(error: BaseException) -> bool:
    if isinstance(error, UserError):  # a CheckpointError is a RuntimeError too
        return False
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _COLLECTIVE_MARKERS)


@dataclass(frozen=True)
class Stopped:
    """Why a run ended before ``train.steps`` and what it left: one line, an exit status."""

    message: str
    code: int


class PeerFailure(Stop):
    """A collective failed because another rank died, failed or hangs (the message names it)."""


class Session:
    """See the module docstring. ``signals`` and ``world_size`` are there for the Trainer."""

    def __init__(self, config):
        self.config = config
        self.signals = StopSignals()
        self.owns_group = False
        self.peers: Optional[peers_module.Peers] = None

    def __enter__(self) -> "Session":
        self.signals.__enter__()
        try:
            self.owns_group = init_from_env(timeout_s=self.config.run.timeout_s)
            if dist.is_initialized() and dist.get_world_size() > 1:
                store = peers_module.connect_store()
                if store is not None:
                    self.peers = peers_module.Peers(store, dist.get_rank(), dist.get_world_size())
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if error is not None and not isinstance(error, Stop):
                self._report(error)
        finally:
            self._teardown()

    def _report(self, error: BaseException) -> None:
        """Tell the other ranks; turn a failed collective into the failure of the rank to blame."""
        if self.peers is None:
            return
        if not is_collective_failure(error):
            self.peers.say("error", one_line(error))
            return
        self.peers.say("peer", one_line(error))
        self._destroy_group()  # ranks still waiting on this one fail now, not at their timeout
        try:
            blame = self.peers.blame(timeout_s=self.config.run.timeout_s)
        except Exception:  # noqa: BLE001 - the store went with the rank that hosted it
            raise PeerFailure("error: lost the rendezvous store and a peer with it (the rank or launcher that "
                              f"hosts it is gone): {one_line(error)}", 1) from None
        speaker = blame.speaker(self.peers.world_size) == self.peers.rank
        raise PeerFailure(f"error: {blame.describe()}; stopping (run the same command to resume from the newest "
                          "checkpoint)", 1, speaker=speaker) from None

    def _destroy_group(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def _teardown(self) -> None:
        try:
            if self.peers is not None:
                self.peers.close()
            self._destroy_group()
        finally:
            self.signals.__exit__(None, None, None)


def signal_stop(signum: int, step: int, path) -> Stopped:
    """The outcome of a run stopped by ``signum`` after ``step`` with its checkpoint at ``path``."""
    name = signal.Signals(signum).name
    return Stopped(f"stopped by {name} after step {step}; checkpoint saved to {path} (run the same command to "
                   "resume)", exit_code(signum))


def rank_zero_first(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 first, then on the other ranks (one process: just ``fn()``).

    For a recipe's ``before_train``, which prepares data on the shared filesystem: ranks doing it
    at once would write the same files together. When rank 0 fails, the others raise the same
    error without a word of their own (rank 0 says it); they never run ``fn``."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            value = fn()
        except Exception as error:
            box[0] = error if isinstance(error, UserError) else Stop(f"error: rank 0 failed: {one_line(error)}", 1)
            dist.broadcast_object_list(box, src=0)
            raise
        dist.broadcast_object_list(box, src=0)
        return value
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Stop):
        raise Stop(str(box[0]), box[0].code, speaker=False)
    if box[0] is not None:
        raise box[0]  # a UserError: only rank 0 prints bad input
    return fn()
