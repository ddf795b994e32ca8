"""Pipeline parallelism as data: stages from the model's parts, schedules as lists of actions.

**Stages.** The ``layers`` rule maps the model's repeated parts (those with a ``layer`` index) onto
``pipe``: with ``P`` pipeline ranks and ``V`` virtual stages each, the repeated parts are cut into
``C = P * V`` contiguous *chunks*, balanced by parameter count (or by an explicit split), the parts
before the first repeated one join chunk 0 and the parts after the last one join chunk ``C - 1``.
Chunk ``c`` runs on pipeline rank ``c mod P`` (Narayanan et al. 2021's interleaving: a rank holds
chunks ``r, r + P, ...``).

**Schedules.** A schedule is, per pipeline rank, the list of :class:`Action` it runs in order: the
forward (``F``) or backward (``B``) of one chunk on one micro-batch. The executor
(:mod:`fastllm.train.pipeline`) runs exactly these actions; activations go to the next chunk's rank
after each forward and gradients to the previous chunk's rank after each backward.

* ``gpipe`` (Huang et al. 2019): every forward, then every backward (last micro-batch first);
* ``1f1b`` (PipeDream-Flush, Narayanan et al. 2021): ``P - 1 - r`` forwards to fill the pipe, then
  one forward and one backward in turn, so a rank holds at most ``P - r`` micro-batches'
  activations instead of all of them;
* ``interleaved`` (Narayanan et al. 2021, sec. 2.2): 1F1B over ``V`` chunks per rank, which cuts
  the fill and drain time by ``V`` for ``V`` times the point-to-point traffic.

:func:`simulate` times a schedule with unit-cost actions (a backward costing ``backward_cost``
forwards) and gives the timeline and the bubble: the fraction of rank-time spent idle. For 1F1B
with equal forward and backward costs it is ``(P - 1) / (M + P - 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Optional

__all__ = ["Action", "SCHEDULES", "schedule", "chunk_of_parts", "simulate", "Timeline"]

SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclass(frozen=True)
class Action:
    """The forward (``"F"``) or backward (``"B"``) of chunk ``chunk`` on micro-batch ``micro``."""

    kind: str
    chunk: int
    micro: int

    def __str__(self) -> str:
        return f"{self.kind}{self.chunk}.{self.micro}"


def _gpipe(pipe: int, micro: int, rank: int) -> list[Action]:
    return [Action("F", rank, m) for m in range(micro)] + [Action("B", rank, m) for m in reversed(range(micro))]


def _one_f_one_b(pipe: int, micro: int, rank: int) -> list[Action]:
    warmup = min(pipe - 1 - rank, micro)
    actions = [Action("F", rank, m) for m in range(warmup)]
    backward = 0
    for m in range(warmup, micro):  # steady state: one forward, one backward
        actions += [Action("F", rank, m), Action("B", rank, backward)]
        backward += 1
    return actions + [Action("B", rank, m) for m in range(backward, micro)]


def _interleaved(pipe: int, virtual: int, micro: int, rank: int) -> list[Action]:
    """Megatron's order: forwards go through the rank's chunks in groups of ``pipe`` micro-batches."""
    total = micro * virtual

    def forward(k: int) -> Action:
        group, within = divmod(k, pipe * virtual)
        return Action("F", ((k // pipe) % virtual) * pipe + rank, group * pipe + k % pipe)

    def backward(k: int) -> Action:
        group = k // (pipe * virtual)
        return Action("B", (virtual - 1 - (k // pipe) % virtual) * pipe + rank, group * pipe + k % pipe)

    warmup = min((pipe - rank - 1) * 2 + (virtual - 1) * pipe, total)
    actions = [forward(k) for k in range(warmup)]
    for k in range(warmup, total):
        actions += [forward(k), backward(k - warmup)]
    return actions + [backward(k) for k in range(total - warmup, total)]


def schedule(name: str, pipe: int, micro: int, virtual: int = 1) -> list[list[Action]]:
    """Every pipeline rank's actions (``[rank][i]``) for ``micro`` micro-batches."""
    if name not in SCHEDULES:
        raise ValueError(f"pipe.schedule must be one of {SCHEDULES}, got {name!r}")
    if (virtual > 1) != (name == "interleaved"):
        raise ValueError(f"pipe.virtual_stages={virtual} needs pipe.schedule='interleaved' (and it needs "
                         "virtual_stages > 1)" if virtual > 1 else "the interleaved schedule needs "
                         "pipe.virtual_stages > 1")
    if name == "interleaved" and micro % pipe:
        raise ValueError(f"the interleaved schedule runs micro-batches in groups of pipe={pipe}: "
                         f"{micro} micro-batches per step do not divide (raise train.batch_size)")
    if name == "gpipe":
        return [_gpipe(pipe, micro, r) for r in range(pipe)]
    if name == "1f1b":
        return [_one_f_one_b(pipe, micro, r) for r in range(pipe)]
    return [_interleaved(pipe, virtual, micro, r) for r in range(pipe)]


def chunk_of_parts(layers: Sequence[Optional[int]], sizes: Sequence[int], chunks: int,
                   split: Optional[Sequence[int]] = None) -> list[int]:
    """The chunk of each part: ``layers[i]`` is part ``i``'s index along ``layers`` (``None`` for a
    part that is not repeated), ``sizes[i]`` its parameter count. The repeated parts are cut into
    ``chunks`` contiguous runs balanced by parameters (or ``split``: repeated parts per chunk)."""
    repeated = [i for i, layer in enumerate(layers) if layer is not None]
    if len(repeated) < chunks:
        raise ValueError(f"{len(repeated)} repeated parts (layers) cannot fill {chunks} pipeline chunks "
                         "(pipe x virtual stages)")
    if split is not None:
        if len(split) != chunks or sum(split) != len(repeated) or min(split) < 1:
            raise ValueError(f"pipe.split={list(split)} must give {chunks} chunks of at least one layer, "
                             f"{len(repeated)} layers in all")
        counts = list(split)
    else:
        counts = _balanced([sizes[i] for i in repeated], chunks)
    chunk_of_repeated, start = {}, 0
    for chunk, count in enumerate(counts):
        for i in repeated[start:start + count]:
            chunk_of_repeated[i] = chunk
        start += count
    first, last = repeated[0], repeated[-1]
    return [chunk_of_repeated.get(i, 0 if i < first else chunks - 1 if i > last else None) for i in range(len(layers))]


def _balanced(sizes: list[int], chunks: int) -> list[int]:
    """Contiguous counts whose sums are as even as greedy filling to the running target makes them."""
    total, counts, done, acc = sum(sizes), [], 0, 0
    for i, size in enumerate(sizes):
        acc += size
        left_items, left_chunks = len(sizes) - i - 1, chunks - len(counts) - 1
        target = total * (len(counts) + 1) / chunks
        if left_chunks and (acc >= target or left_items == left_chunks):
            counts.append(i + 1 - done)
            done = i + 1
    counts.append(len(sizes) - done)
    return counts


@dataclass(frozen=True)
class Timeline:
    """When each action of a schedule ran, with unit-cost forwards."""

    pipe: int
    rows: tuple[tuple[tuple[int, int, Action], ...], ...]  # per rank: (start, end, action)
    makespan: int

    @property
    def bubble(self) -> float:
        busy = sum(end - start for row in self.rows for start, end, _ in row)
        return 1.0 - busy / (self.pipe * self.makespan)

    def __str__(self) -> str:
        width = max(len(str(a)) for row in self.rows for _, _, a in row)
        lines = []
        for rank, row in enumerate(self.rows):
            cells = ["." * width] * self.makespan
            for start, end, action in row:
                for t in range(start, end):
                    cells[t] = str(action).ljust(width)
            lines.append(f"pipe {rank}: " + " ".join(cells))
        return "\n".join(lines) + f"\nbubble {self.bubble:.1%} of {self.pipe} ranks x {self.makespan} time units"


def simulate(actions: list[list[Action]], backward_cost: int = 1) -> Timeline:
    """Run a schedule with forwards costing 1 and backwards ``backward_cost``: each action starts when
    its rank is free and its inputs exist (the previous chunk's forward, the next chunk's backward)."""
    pipe = len(actions)
    chunks = max(a.chunk for row in actions for a in row) + 1
    done: dict[tuple[str, int, int], int] = {}
    position, free = [0] * pipe, [0] * pipe
    rows: list[list] = [[] for _ in range(pipe)]
    while any(position[r] < len(actions[r]) for r in range(pipe)):
        progressed = False
        for r in range(pipe):
            if position[r] == len(actions[r]):
                continue
            a = actions[r][position[r]]
            needs = []
            if a.kind == "F" and a.chunk > 0:
                needs.append(("F", a.chunk - 1, a.micro))
            if a.kind == "B":
                needs.append(("F", a.chunk, a.micro))
                if a.chunk < chunks - 1:
                    needs.append(("B", a.chunk + 1, a.micro))
            if not all(n in done for n in needs):
                continue
            start = max([free[r]] + [done[n] for n in needs])
            end = start + (1 if a.kind == "F" else backward_cost)
            done[(a.kind, a.chunk, a.micro)] = end
            rows[r].append((start, end, a))
            free[r], position[r], progressed = end, position[r] + 1, True
        if not progressed:
            stuck = {r: str(actions[r][position[r]]) for r in range(pipe) if position[r] < len(actions[r])}
            raise ValueError(f"the schedule deadlocks: every rank waits ({stuck})")
    return Timeline(pipe, tuple(tuple(row) for row in rows), max(free))
