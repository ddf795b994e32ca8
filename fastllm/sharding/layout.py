"""The partitioner's activation layout: runs :mod:`fastllm.nn.ops` on shards, moving operands by the rules.

For one operation (a local function and its named operands and results) the layout:

1. assigns every logical dim of the operation its mesh axes, jointly over all operands and results
   (:func:`fastllm.sharding.rules.assign`: one answer per dim, each mesh axis at most once per
   tensor), which is where each rank computes its block of the operation;
2. moves each activation from its own placement (the rules applied to its dims alone) to the
   operation's (:func:`fastllm.sharding.placement.relayout`). Its gradient comes back as partial
   sums over every mesh axis the operation is split over and the operand is not (the operand was
   broadcast along those blocks), which the backward of that move adds up;
3. runs the local function on the blocks;
4. moves each result from where it was computed (partial sums over the axes of the dims it summed
   away) to its own placement. The train step sums the ranks' losses over the axes that split
   ``batch``, so a result that is whole along those axes (a statistic of the global batch, such as
   a mixture of experts' router load) gets gradients that are partial sums over them: its move's
   backward adds them up.

Parameters are never moved: their placement must already be the operation's (else the rules
disagree with themselves, an error naming the operand), and their gradients stay partial sums
over the batch (and, where the stream's ``seq`` is split, the sequence) for the train step to
reduce with the others, as :meth:`MeshLayout.param_reduce_axes` predicts. A parameter may share a
mesh axis with the tokens when its rule comes first in the table: ``experts`` before ``batch``
puts each expert's weights on one ``data`` rank, the routed tokens come to them whole, and their
gradients need no sum over ``data`` (expert parallelism). Inputs (the batch) are split over what
``batch`` maps to and whole elsewhere.

Applied to a transformer with ``heads``, ``mlp`` and ``vocab`` on ``tensor`` these steps give
Megatron-LM's tensor parallelism (Shoeybi et al. 2019): the projections' input is an identity
forward with an all-reduce of its gradient, the output projection's partial sums are all-reduced,
the vocabulary-parallel embedding sums masked lookups. With ``seq`` on ``tensor`` too, the
residual stream keeps a block of the sequence and the same moves become all-gathers and
reduce-scatters (Korthikanti et al. 2022). docs/sharding.md works the example through.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from fastllm.nn import ops
from fastllm.sharding.mesh import AXES, Mesh
from fastllm.sharding.placement import Placement, relayout
from fastllm.sharding.rules import Rules, assign

__all__ = ["MeshLayout", "STREAM_DIMS"]

STREAM_DIMS = ("batch", "seq")  # the token dims every parameter's operations run over


class _Shards(ops.Shards):
    def __init__(self, mesh: Mesh, dims: dict[str, tuple[str, ...]]):
        self.mesh, self.dims = mesh, dims

    def index(self, name: str) -> int:
        axes = self.dims.get(name, ())
        return self.mesh.rank(axes) if axes else 0

    def count(self, name: str) -> int:
        return self.mesh.size(self.dims.get(name, ()))

    def group(self, name: str) -> Any:
        axes = self.dims.get(name, ())
        if len(axes) > 1:
            raise NotImplementedError(f"dim {name!r} is split over several mesh axes {axes}")
        return self.mesh.group(axes[0]) if axes else None


def _cached(cache: dict, key: Any, make: Callable[[], Any]) -> Any:
    """``cache[key]``, made on first use. While dynamo traces (a compiled part) the value is made
    afresh and becomes the graph's constants: reading a cache that later grows would guard on its
    keys and recompile the part once per new entry."""
    if torch.compiler.is_compiling():
        return make()
    found = cache.get(key)
    if found is None:
        found = cache[key] = make()
    return found


@dataclass(frozen=True)
class _OpPlan:
    """How one operation signature runs: where each operand goes, where each result comes back."""

    moves: tuple[Optional[tuple[Placement, Placement, frozenset]], ...]  # per operand (None: stays)
    results: tuple[Optional[tuple[Placement, Placement, frozenset]], ...]  # per result: (computed, own, grad partial)
    shards: _Shards


class MeshLayout:
    """Implements :class:`fastllm.nn.ops.Layout` for a mesh and a rules table (module docstring).

    ``trace`` (a list) records every collective the operations run (on an abstract mesh they only
    record: tensors are ``meta``). Axes of one rank are left out of placements: nothing moves over them.
    """

    def __init__(self, mesh: Mesh, rules: Rules, *, trace: Optional[list] = None):
        self.mesh, self.rules, self.trace = mesh, rules, trace
        self.active = frozenset(axis for axis in AXES if mesh.size(axis) > 1)
        self._plans: dict = {}
        self._placements: dict = {}

    def __repr__(self) -> str:
        return f"MeshLayout({self.mesh!r})"

    # --- placements -----------------------------------------------------------------------------
    def dims_of(self, operands: Sequence[tuple[str, ...]], what: str = "op") -> dict[str, tuple[str, ...]]:
        """The active mesh axes of each logical dim of an operation with these operands."""
        assigned = assign(list(operands), self.rules, what=what)
        return {name: tuple(a for a in axes if a in self.active) for name, axes in assigned.items()}

    def placement(self, axes: tuple[str, ...]) -> Placement:
        """Where a tensor with these dims lives between operations (the rules on its dims alone)."""
        return _cached(self._placements, axes, lambda: self._placement(axes))

    def _placement(self, axes: tuple[str, ...]) -> Placement:
        if len(set(axes)) != len(axes):
            raise ValueError(f"a tensor's dims must have distinct names, got {axes}")
        dims = self.dims_of([axes], what=f"tensor {axes}")
        return Placement(tuple(dims[name] for name in axes))

    def input_placement(self, axes: tuple[str, ...]) -> Placement:
        """Where an input (batch data) lives: split as ``batch`` is, whole along every other dim."""
        batch = self.placement(("batch",)).dims[0] if "batch" in axes else ()
        return Placement(tuple(batch if name == "batch" else () for name in axes))

    @property
    def summed(self) -> frozenset[str]:
        """The axes over which the train step sums the ranks' losses: those splitting ``batch``."""
        return frozenset(self.placement(("batch",)).dims[0])

    def _with_tokens(self, axes: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
        """The split of an operation using a parameter with these dims: its dims and the token dims."""
        stream = tuple(name for name in STREAM_DIMS if name not in axes)
        return self.dims_of([(*axes, *stream)], what=f"parameter {axes}")

    def param_reduce_axes(self, axes: tuple[str, ...]) -> frozenset[str]:
        """The mesh axes over which a parameter with these dims gets partial gradients: those that
        split the operations it is used in (its dims and the token dims) and not the parameter."""
        return frozenset(a for d in self._with_tokens(axes).values() for a in d) - self.placement(axes).axes

    def check_param(self, axes: tuple[str, ...], path: str = "a parameter") -> None:
        """The rules must split a parameter in its operations (beside the token dims) as they split it
        alone: a dim whose rule takes a mesh axis that ``batch`` takes first cannot hold it there."""
        there = self._with_tokens(axes)
        own = self.placement(axes)
        if tuple(there[name] for name in axes) != own.dims:
            taken = sorted(set(own.axes) - {a for name in axes for a in there[name]})
            raise ValueError(f"{path}: the rules split it over {taken} ({own}), but its operations split the tokens "
                             f"over {taken} first; put the rule of its dim before 'batch' in the table (as "
                             "'experts' for expert parallelism), or leave the split over 'data' to ZeRO's storage")

    # --- operations ----------------------------------------------------------------------------
    def _plan(self, signature: tuple, options: tuple) -> _OpPlan:
        (operands, out_axes), (reduced, whole, inner, keep) = signature, options
        rules = Rules(tuple((name, None) for name in whole)) + self.rules if whole else self.rules
        assigned = assign([axes for axes, _ in operands] + list(out_axes) + list(inner), rules)
        dims = {name: tuple(a for a in axes if a in self.active) for name, axes in assigned.items()}
        used = frozenset(a for d in dims.values() for a in d)
        moves = []
        for axes, kind in operands:
            there = Placement(tuple(dims[name] for name in axes))
            if kind == "param":
                self._check_param(axes, there, used)
                moves.append(None)
                continue
            here = self.input_placement(axes) if kind == "input" else self.placement(axes)
            grad_partial = frozenset() if kind == "input" else used - there.axes  # broadcast blocks
            moves.append(None if here == there and not grad_partial else (here, there, grad_partial))
        inside = frozenset(a for name in reduced for a in dims.get(name, ()))
        kept = frozenset(a for name in keep for a in self.placement((name,)).dims[0])
        results = []
        for axes in out_axes:
            dims_axes = tuple(dims[name] for name in axes)
            computed = Placement(dims_axes, used - inside - frozenset(a for d in dims_axes for a in d))
            own = self.placement(axes)
            own = Placement(own.dims, computed.partial & kept)
            grad_partial = self.summed - own.axes  # whole over the summed losses' axes (see the docstring)
            moved = computed != own or grad_partial  # else no collective either way: no call (nor graph break)
            results.append((computed, own, grad_partial) if moved else None)
        return _OpPlan(tuple(moves), tuple(results), _Shards(self.mesh, dims))

    def _check_param(self, axes: tuple[str, ...], there: Placement, used: frozenset) -> None:
        own = self.placement(axes)
        if own != there:
            raise ValueError(f"a parameter with dims {axes} is laid out {own} by the rules but an operation "
                             f"using it needs {there}: reorder the rules so that they agree")
        expected = self.param_reduce_axes(axes)
        if used - there.axes != expected:
            raise ValueError(f"a parameter with dims {axes} is used in an operation split over {sorted(used)}; "
                             f"its gradient reduction assumes partial sums over {sorted(expected)}")

    def local(self, fn: Callable[..., Any], args: Sequence[ops.Arg], out_axes: Sequence[tuple[str, ...]], *,
              reduced: tuple[str, ...] = (), whole: tuple[str, ...] = (), inner: Sequence[tuple[str, ...]] = (),
              keep: tuple[str, ...] = (), name: str = "op") -> list[ops.Value]:
        """:func:`fastllm.nn.ops.local` on this rank's blocks (``name``: for traces)."""
        signature = (tuple((arg.axes, arg.kind) for arg in args), tuple(tuple(a) for a in out_axes))
        options = (tuple(reduced), tuple(whole), tuple(tuple(a) for a in inner), tuple(keep))
        plan = _cached(self._plans, (signature, options), lambda: self._plan(signature, options))
        values = []
        for arg, move in zip(args, plan.moves):
            if move is None:
                values.append(arg.value)
            else:
                here, there, grad_partial = move
                values.append(relayout(arg.value, here, there, self.mesh, grad_partial=grad_partial,
                                       trace=self.trace, what=f"{name}: its input {' '.join(arg.axes)}"))
        out = fn(plan.shards, *values)
        out = list(out) if isinstance(out, tuple) else [out]
        return [y if result is None else
                relayout(y, result[0], result[1], self.mesh, grad_partial=result[2], trace=self.trace,
                         what=f"{name}: its result {' '.join(axes)}")
                for y, result, axes in zip(out, plan.results, out_axes)]
