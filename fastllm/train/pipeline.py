"""The pipeline executor: runs one pipeline rank's actions of a schedule (:mod:`fastllm.sharding.pipeline`).

A forward ``F(c, m)`` runs chunk ``c``'s parts on micro-batch ``m`` (receiving the carry of chunk
``c - 1`` from its rank first, unless ``c`` is the first chunk) and sends the carry it leaves to the
rank of chunk ``c + 1``; the last chunk's carry holds the loss instead. A backward ``B(c, m)``
receives the gradient of that carry from chunk ``c + 1`` (or starts from the weighted loss),
backpropagates through the chunk, accumulating into the parameters' ``.grad``, and sends the
gradient of its input carry to chunk ``c - 1``. Sends are asynchronous; a receive waits, and the
schedule is what guarantees that every wait ends.

What travels is the carry: a dict of tensors whose shapes, dtypes and whether they carry a gradient
are found once per batch shape by running the model's parts on ``meta`` tensors (no values, no
messages). Each rank talks only to its counterpart (the same ``data`` and ``tensor`` coordinates)
in the neighbouring stages, so tensor-parallel shards travel as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fastllm import nn, tree
from fastllm.sharding import Mesh, MeshLayout
from fastllm.sharding.partitioner import Plan
from fastllm.sharding.pipeline import Action
from fastllm.sharding.spec import is_spec, local_shape

__all__ = ["PipelineExecutor", "CarrySpec", "sum_over_stages"]

_MAX_CARRY = 64  # tensors in one carry


@dataclass(frozen=True)
class CarrySpec:
    """One tensor of a carry between chunks: its local shape, dtype and whether it has a gradient."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    grad: bool


class PipelineExecutor:
    """Runs one pipeline rank's actions (see the module docstring) for a model under a plan."""

    def __init__(self, model: nn.Model, plan: Plan, mesh: Mesh, rules, dtype: torch.dtype):
        self.model, self.plan, self.mesh, self.rules, self.dtype = model, plan, mesh, rules, dtype
        self.chunks = plan.chunks
        self.parts_of = [[i for i, part in enumerate(plan.parts) if part.chunk == c] for c in range(self.chunks)]
        self._boundaries: dict[tuple, list[dict[str, CarrySpec]]] = {}
        self.executed: list[Action] = []  # the actions of the last run, in order (tests)

    # --- who is where ---
    def rank_of_chunk(self, chunk: int) -> int:
        """The global rank running ``chunk`` with this rank's data and tensor coordinates."""
        return self.mesh.rank_of({**self.mesh.coords, "pipe": chunk % self.mesh.size("pipe")})

    # --- the carries' shapes ---
    def boundaries(self, batch: dict[str, Tensor]) -> list[dict[str, CarrySpec]]:
        """The carry each chunk leaves (shapes, dtypes, gradients), for a micro-batch like ``batch``."""
        key = tuple(sorted((name, tuple(t.shape), t.dtype) for name, t in batch.items()))
        if key not in self._boundaries:
            self._boundaries[key] = self._dry_run(batch)
        return self._boundaries[key]

    def _dry_run(self, batch: dict[str, Tensor]) -> list[dict[str, CarrySpec]]:
        mesh = Mesh.abstract(**self.mesh.shape, rank=self.mesh.global_rank)
        specs = tree.flatten(self.plan.compute, is_leaf=is_spec)
        params = tree.map_with_path(
            lambda path, p: torch.empty(local_shape(p.shape, specs[path], mesh, name=path), dtype=self.dtype,
                                        device="meta", requires_grad=True),
            self.plan.declarations, is_leaf=nn.is_param)
        meta_batch = {name: torch.empty_like(t, device="meta") for name, t in batch.items()}
        layout = MeshLayout(mesh, self.rules, trace=[])  # records, moves nothing
        carry, boundaries = {}, []
        with torch.enable_grad():
            for chunk in range(self.chunks):
                for index in self.parts_of[chunk]:
                    part = self.model.parts[index]
                    carry = part.fn(part.static, nn.model.part_params(part, params), carry, meta_batch, layout)
                boundaries.append({name: CarrySpec(tuple(t.shape), t.dtype, t.requires_grad)
                                   for name, t in sorted(carry.items())})
        return boundaries

    # --- point to point ---
    def _tag(self, action: Action, backward: bool) -> int:
        """A message's tag: its action and direction, times room for the carry's tensors (gloo
        matches on tags; NCCL matches in order, which the schedules keep)."""
        return ((action.chunk * 4096 + action.micro) * 2 + backward) * _MAX_CARRY

    def _receive(self, specs: dict[str, CarrySpec], src: int, tag: int, device, grads: bool) -> dict[str, Tensor]:
        names = [n for n, s in specs.items() if s.grad or not grads]
        out = {n: torch.empty(specs[n].shape, dtype=specs[n].dtype, device=device) for n in names}
        works = [dist.irecv(out[n], src=src, tag=tag + i) for i, n in enumerate(names)]
        for work in works:
            work.wait()
        return out

    def _send(self, tensors: dict[str, Tensor], dst: int, tag: int, pending: list) -> None:
        for i, name in enumerate(sorted(tensors)):  # the order the receiver's specs list them in
            t = tensors[name].detach().contiguous()
            pending.append((dist.isend(t, dst=dst, tag=tag + i), t))  # the tensor lives until waited for

    # --- a schedule ---
    def run(self, actions: list[Action], micro_batches: list[dict[str, Tensor]], params: Any,
            call: Callable[..., dict], weight: Callable[[int, Tensor], Tensor], device: torch.device) -> Tensor:
        """Run this rank's ``actions``; ``call(index, part, params, carry, batch, layout)`` runs one part
        (the step's runner, layout bound), ``weight(m, loss)`` turns micro-batch ``m``'s loss into what
        its backward starts from. Returns the sum of the weighted losses this rank computed (the last
        stage's; zero elsewhere)."""
        last = self.chunks - 1
        boundaries = self.boundaries(micro_batches[0])
        stash: dict[tuple[int, int], tuple[dict, Any]] = {}
        pending: list = []
        total = torch.zeros((), dtype=torch.float32, device=device)
        self.executed = []
        for action in actions:
            c, m = action.chunk, action.micro
            if action.kind == "F":
                carry = {} if c == 0 else self._inputs(boundaries[c - 1], self.rank_of_chunk(c - 1),
                                                       self._tag(action, False), device)
                inputs = carry
                for index in self.parts_of[c]:
                    carry = call(index, self.model.parts[index], params, carry, micro_batches[m])
                if c == last:
                    weighted = weight(m, carry["loss"])
                    total = total + weighted.detach()
                    stash[c, m] = (inputs, weighted)
                else:
                    self._send(carry, self.rank_of_chunk(c + 1), self._tag(Action("F", c + 1, m), False), pending)
                    stash[c, m] = (inputs, carry)
            else:
                inputs, outputs = stash.pop((c, m))
                if c == last:
                    outputs.backward()
                else:
                    grads = self._receive(boundaries[c], self.rank_of_chunk(c + 1), self._tag(action, True), device,
                                          grads=True)
                    names = [n for n in grads if outputs[n].requires_grad]
                    torch.autograd.backward([outputs[n] for n in names], [grads[n] for n in names])
                if c > 0:
                    back = {n: inputs[n].grad if inputs[n].grad is not None else torch.zeros_like(inputs[n])
                            for n, s in boundaries[c - 1].items() if s.grad}
                    self._send(back, self.rank_of_chunk(c - 1), self._tag(Action("B", c - 1, m), True), pending)
            self.executed.append(action)
        for work, _ in pending:
            work.wait()
        return total

    def _inputs(self, specs: dict[str, CarrySpec], src: int, tag: int, device) -> dict[str, Tensor]:
        carry = self._receive(specs, src, tag, device, grads=False)
        return {n: t.requires_grad_(True) if specs[n].grad else t for n, t in carry.items()}

    def forward_only(self, chunks: list[int], batch: dict[str, Tensor], params: Any,
                     call: Callable[..., dict], device: torch.device) -> Optional[dict]:
        """Evaluation: this rank's chunks in order on one batch; the last chunk's carry, or ``None``
        on the other stages."""
        boundaries, pending, carry = self.boundaries(batch), [], None
        for c in sorted(chunks):
            carry = {} if c == 0 else self._receive(boundaries[c - 1], self.rank_of_chunk(c - 1),
                                                    self._tag(Action("F", c, 0), False), device, grads=False)
            for index in self.parts_of[c]:
                carry = call(index, self.model.parts[index], params, carry, batch)
            if c < self.chunks - 1:
                self._send(carry, self.rank_of_chunk(c + 1), self._tag(Action("F", c + 1, 0), False), pending)
                carry = None
        for work, _ in pending:
            work.wait()
        return carry


def sum_over_stages(grads: dict[str, Tensor], stages_of: dict[str, tuple[int, ...]], mesh: Mesh) -> dict[str, Tensor]:
    """Gradients of leaves held by two pipeline stages (a table the embedding and the head share)
    summed over both, the same bits on each: first stage's + last stage's, on both."""
    out, pending = dict(grads), []
    shared = [(path, stages) for path, stages in stages_of.items() if len(stages) > 1 and path in grads]
    received = {}
    for path, stages in shared:
        if len(stages) != 2:
            raise NotImplementedError(f"{path} is used by {len(stages)} pipeline stages; two at most")
        me = mesh.rank("pipe")
        peer = mesh.rank_of({**mesh.coords, "pipe": stages[0] if me == stages[1] else stages[1]})
        mine = grads[path].contiguous()
        received[path] = torch.empty_like(mine)
        pending += [dist.isend(mine, dst=peer), dist.irecv(received[path], src=peer)]
    for work in pending:
        work.wait()
    for path, stages in shared:
        first, second = (grads[path], received[path]) if mesh.rank("pipe") == stages[0] else (received[path], grads[path])
        out[path] = first + second
    return out
