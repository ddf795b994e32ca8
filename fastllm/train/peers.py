"""Which rank to blame when a collective fails: heartbeats and last words in the rendezvous store.

A collective that fails tells a rank only that *some* peer is gone: gloo says "connection closed by
peer 10.0.0.7:41212" when a process died, "timed out waiting" when one hangs, and names no rank.
So each rank keeps, in the store that torchrun (or the test harness) already runs for the
rendezvous, a heartbeat counter that a small thread increments every ``interval_s``, and writes one
line there before it exits with an error. When a collective fails, a rank reads them:

- a rank whose heartbeat stood still over ``window_s`` and said nothing **died** (killed, crashed
  without a word) or is frozen entirely;
- a rank that said ``error: ...`` **failed** with that error;
- a rank that beats but said nothing while the others gave up on a collective **hangs**: it did
  not join the collective within ``run.timeout_s``.

Ranks that merely saw the failure too (they said ``peer: ...``) are not blamed. The store is a
second client connection to the rendezvous store, apart from the process group's own; keys carry
torchrun's run id and restart count, so an earlier attempt's words are not read as this one's.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

__all__ = ["Peers", "Blame", "connect_store"]

_STORE_TIMEOUT = timedelta(seconds=10)


def connect_store() -> Optional[dist.Store]:
    """A client of the rendezvous store named by torchrun's ``MASTER_ADDR``/``MASTER_PORT``
    (``None`` outside a launcher)."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    store = dist.TCPStore(host, int(port), is_master=False, timeout=_STORE_TIMEOUT, wait_for_workers=False)
    run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return dist.PrefixStore(f"fastllm/{run}/", store)


@dataclass
class Blame:
    """The outcome of :meth:`Peers.blame`: the ranks at fault, each with what happened to it."""

    culprits: dict[int, str] = field(default_factory=dict)
    survivors: list[int] = field(default_factory=list)  # ranks that saw the failure too

    def speaker(self, world_size: int) -> Optional[int]:
        """The rank that reports it: the lowest one not at fault; none when rank 0 failed with an
        error of its own, which it printed itself."""
        if self.culprits.get(0, "").startswith("failed"):
            return None
        return min((r for r in range(world_size) if r not in self.culprits), default=None)

    def describe(self) -> str:
        return "; ".join(f"rank {rank} {what}" for rank, what in sorted(self.culprits.items()))


class Peers:
    """This rank's heartbeat and last words, and the reading of everyone's (module docstring)."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, *, interval_s: float = 0.5):
        self.store, self.rank, self.world_size, self.interval_s = store, rank, world_size, interval_s
        self._lock = threading.Lock()  # one store connection, used from the heartbeat thread too
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="fastllm-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with self._lock:
                    self.store.add(f"beat/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store is gone; a diagnosis will say so
                return

    def say(self, kind: str, text: str) -> None:
        """Leave ``kind: text`` (``error`` or ``peer``) for the others; best effort."""
        try:
            with self._lock:
                self.store.set(f"said/{self.rank}", f"{kind}: {text}")
        except Exception:  # noqa: BLE001 - nobody can read it then anyway
            pass

    def _beats(self) -> list[int]:
        with self._lock:
            return [int(self.store.add(f"beat/{r}", 0)) for r in range(self.world_size)]

    def _said(self) -> dict[int, str]:
        with self._lock:
            keys = [f"said/{r}" for r in range(self.world_size)]
            return {r: self.store.get(k).decode(errors="replace") for r, k in enumerate(keys)
                    if self.store.check([k])}

    def blame(self, window_s: float = 3.0, timeout_s: Optional[float] = None) -> Blame:
        """Watch the others for ``window_s`` and say who is at fault (module docstring)."""
        before = self._beats()
        time.sleep(window_s)
        after, said = self._beats(), self._said()
        blame = Blame()
        for rank in range(self.world_size):
            words = said.get(rank, "")
            if rank == self.rank or words.startswith("peer:"):
                blame.survivors.append(rank)
            elif words.startswith("error:"):
                blame.culprits[rank] = f"failed: {words.removeprefix('error: ')}"
            elif after[rank] == before[rank]:
                blame.culprits[rank] = f"died (no heartbeat for {window_s:g} s: killed, crashed or frozen)"
        if not blame.culprits:  # nobody dead or failed: those that beat and said nothing hang
            waited = "" if timeout_s is None else f" within run.timeout_s={timeout_s:g}"
            for rank in range(self.world_size):
                if rank not in blame.survivors:
                    blame.culprits[rank] = f"hangs (alive, but did not join a collective{waited})"
        return blame

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
