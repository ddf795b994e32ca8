"""Operations on named dims: where model code says what its tensors' dims are, and nothing more.

A layer names the logical dims of what it computes with (``("batch", "seq", "embed")`` for the
residual stream, its weights' names from their :class:`fastllm.nn.Param` declarations) and calls
these functions. With ``layout=None`` each is the plain single-device computation. Under a
parallel layout (:class:`Layout`, built by ``fastllm.sharding`` from the mesh and the rules table)
the same call runs on local shards: the layout places every named dim by the rules, moves the
operands where the operation needs them and its results back, and picks the collectives each move
implies (docs/sharding.md). Model code never says *how* a tensor is split, or that it is.

================================  ===============================================================
function                          computes
================================  ===============================================================
:func:`dense`                     ``x W^T (+ b)`` contracting the dims ``x`` and ``W`` share
:func:`projections`               several :func:`dense` of one input (q, k, v; up and gate)
:func:`lookup`                    rows of a table (token or position embeddings)
:func:`linear_cross_entropy`      the LM head and its loss, without the ``[tokens, vocab]`` logits
:func:`cross_entropy`             the loss of logits (their vocabulary may be split)
:func:`local`                     any function of local shards (the primitive the others use)
================================  ===============================================================

Three kinds of operands: *activations* (laid out by the rules), *parameters* (the step hands them
over laid out by the rules; an operation never moves them) and *inputs* (the batch: split over
``data`` by rows like every batch-sized tensor, whole along every other dim). An activation may be
:class:`Ragged`: rows grouped into cells of varying size (tokens routed to experts), which a layout
moves cell by cell like a dense tensor of its group dims.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Protocol, Union, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor


from fastllm.kernels import Choice, Matmul, VocabShard, fp8_linear
from fastllm.nn.loss import cross_entropy as _cross_entropy
from fastllm.nn.loss import linear_cross_entropy as _linear_cross_entropy

__all__ = [
    "Axes",
    "STREAM",
    "Ragged",
    "Arg",
    "activation",
    "param",
    "data",
    "Shards",
    "Layout",
    "local",
    "dense",
    "projections",
    "dense_axes",
    "lookup",
    "linear_cross_entropy",
    "cross_entropy",
]

Axes = tuple[str, ...]
STREAM: Axes = ("batch", "seq", "embed")  # the residual stream


@dataclass(frozen=True, eq=False)
class Ragged:
    """Rows grouped into cells of varying size: the tokens routed to each expert.

    ``counts`` (int64) holds the number of rows of each cell and ``rows`` the cells' rows one cell
    after another, cells in row-major order of ``counts``. Its logical dims are ``counts``' dims
    (the *group* dims: ``experts``, then the token dims the rows came from, each holding the blocks
    of tokens its cells came from) followed by the dims of one row (``embed``). On one device a
    dispatch makes ``counts`` of shape ``[experts, 1, 1]``: all tokens are one block. A layout moves
    a ragged tensor as it moves a dense one of the same dims, the rows following their cells
    (:mod:`fastllm.sharding.ragged`); ``route`` is the layout's note of how it moved them (opaque
    here), which :meth:`with_rows` keeps so that moving the new rows back costs no second exchange
    of counts."""

    rows: Tensor  # [sum(counts), *row dims]
    counts: Tensor  # [experts, *token blocks]
    route: tuple = ()

    def per_group(self) -> Tensor:
        """Rows of each entry of the first group dim (each expert's rows are contiguous)."""
        return self.counts.reshape(self.counts.shape[0], -1).sum(1)

    def with_rows(self, rows: Tensor) -> "Ragged":
        """New rows in the same cells (e.g. each row through its expert)."""
        return Ragged(rows, self.counts, self.route)


Value = Union[Tensor, Ragged]


class Arg(NamedTuple):
    """One operand: its value, the logical name of each dim, and its kind (see the module docstring)."""

    value: Value
    axes: Axes
    kind: str  # "activation" | "param" | "input"


def activation(value: Value, axes: Axes) -> Arg:
    return Arg(value, tuple(axes), "activation")


def param(value: Tensor, axes: Axes) -> Arg:
    return Arg(value, tuple(axes), "param")


def data(value: Tensor, axes: Axes) -> Arg:
    return Arg(value, tuple(axes), "input")


class Shards:
    """What a local function needs to know of the split: for a logical dim, which block this rank
    holds. The single-device value: every dim whole."""

    def index(self, name: str) -> int:
        """This rank's block along ``name`` (0 when whole)."""
        return 0

    def count(self, name: str) -> int:
        """Number of blocks ``name`` is split into (1 when whole)."""
        return 1

    def group(self, name: str) -> Any:
        """The process group of the ranks that share the other blocks of ``name`` (``None`` when whole)."""
        return None


WHOLE = Shards()


@runtime_checkable
class Layout(Protocol):
    """A parallel layout (``fastllm.sharding``): runs a local function on shards (see :func:`local`)."""

    def local(self, fn: Callable[..., Any], args: Sequence[Arg], out_axes: Sequence[Axes], *,
              reduced: Axes = (), whole: Axes = (), inner: Sequence[Axes] = (), keep: Axes = (),
              name: str = "op") -> list[Value]: ...


def local(
    layout: Optional[Layout], fn: Callable[..., Any], args: Sequence[Arg], out_axes: Sequence[Axes], *,
    reduced: Axes = (), whole: Axes = (), inner: Sequence[Axes] = (), keep: Axes = (), name: str = "op",
) -> list[Value]:
    """``fn(shards, *tensors)`` on every rank's blocks: the outputs named ``out_axes`` (a list).

    Every logical dim gets one split for the whole operation, so ``fn`` sees matching blocks of all
    its operands. A dim that an operand has and an output lacks is summed over by ``fn`` (a
    contraction): a split of it leaves each rank a partial sum, which the layout adds up. Name in
    ``reduced`` the dims ``fn`` reduces across ranks itself (through ``shards.group``), in ``whole``
    the dims it needs whole on every rank, and in ``inner`` the dims of tensors it makes inside (the
    logits of a loss), so that no two of their dims share a mesh axis. Results stay partial sums
    over the split of the dims in ``keep`` (a loss over this data rank's rows: ``keep=("batch",)``,
    summed over ranks by the train step with the gradients). ``fn`` returns a tensor per entry of
    ``out_axes`` (a tuple when several). ``name`` labels the operation in a layout's trace.
    """
    if layout is None:
        out = fn(WHOLE, *(arg.value for arg in args))
        return list(out) if isinstance(out, tuple) else [out]
    return layout.local(fn, args, out_axes, reduced=reduced, whole=whole, inner=inner, keep=keep, name=name)


def dense_axes(x_axes: Axes, w_axes: Axes) -> Axes:
    """The dims of ``dense(x, w)``: ``x``'s without the contracted trailing ones, then ``w``'s
    leading (output) ones."""
    k = _contracted(x_axes, w_axes)
    return (*x_axes[:len(x_axes) - k], *w_axes[:len(w_axes) - k])


def _contracted(x_axes: Axes, w_axes: Axes) -> int:
    """How many trailing dims ``x`` and ``w`` share (the contraction), at least one."""
    k = 0
    while k < min(len(x_axes), len(w_axes)) and x_axes[len(x_axes) - 1 - k] == w_axes[len(w_axes) - 1 - k]:
        k += 1
    if k == 0:
        raise ValueError(f"dense: {x_axes} and {w_axes} share no trailing dim to contract")
    return k


def _matmul(k: int, x: Tensor, w: Tensor, b: Optional[Tensor] = None, fp8: bool = False) -> Tensor:
    """``x`` ``[..., K1..Kk]`` times ``w`` ``[N1..Nm, K1..Kk]`` as one ``F.linear`` (cuBLAS' layout),
    or with ``fp8`` as one :func:`fastllm.kernels.fp8.fp8_linear`."""
    out_shape = w.shape[:w.ndim - k]
    x = x.flatten(x.ndim - k) if k > 1 else x
    w = w.reshape(math.prod(out_shape), -1)
    if fp8:
        y = fp8_linear(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], -1)
        y = y if b is None else y + b.reshape(-1)
    else:
        y = F.linear(x, w, None if b is None else b.reshape(-1))
    return y.unflatten(-1, out_shape) if len(out_shape) != 1 else y


def projections(
    layout: Optional[Layout],
    x: Tensor,
    x_axes: Axes,
    weights: Sequence[tuple[Tensor, Axes, Optional[Tensor]]],
    *,
    matmul: Matmul = "compute",
) -> list[Tensor]:
    """``[dense(x, w, b) for (w, w_axes, b) in weights]``, in one operation: one move of ``x`` for
    all of them (the q, k and v projections share theirs, and so its gradient's sum). ``matmul``:
    in ``x``'s dtype, or ``"fp8"`` (:mod:`fastllm.kernels.fp8`)."""
    counts = [_contracted(x_axes, w_axes) for _, w_axes, _ in weights]
    fp8 = matmul == "fp8"
    if layout is None:
        return [_matmul(k, x, w, b, fp8) for k, (w, _, b) in zip(counts, weights)]
    out_axes = [dense_axes(x_axes, w_axes) for _, w_axes, _ in weights]

    def matmuls(shards: Shards, x: Tensor, *ws: Tensor) -> tuple[Tensor, ...]:
        return tuple(_matmul(k, x, w, fp8=fp8) for k, w in zip(counts, ws))

    args = [activation(x, x_axes)] + [param(w, w_axes) for w, w_axes, _ in weights]
    name = "dense " + ", ".join(" ".join(w_axes) for _, w_axes, _ in weights)
    outs = layout.local(matmuls, args, out_axes, name=name)
    # Biases join after the layout has summed partial products (once, not once per rank).
    return [y if b is None else y + b for y, (_, _, b) in zip(outs, weights)]


def dense(
    layout: Optional[Layout], x: Tensor, x_axes: Axes, w: Tensor, w_axes: Axes, b: Optional[Tensor] = None,
    *, matmul: Matmul = "compute",
) -> Tensor:
    """``x W^T + b`` over the dims ``x`` and ``w`` share at their ends; ``w`` is ``[out..., in...]``.

    ``dense(layout, x, ("batch", "seq", "heads", "head_dim"), wo, ("embed", "heads", "head_dim"))``
    is attention's output projection: its result is ``("batch", "seq", "embed")``.
    """
    return projections(layout, x, x_axes, [(w, w_axes, b)], matmul=matmul)[0]


def _rows(shards: Shards, table: Tensor, ids: Tensor, name: str) -> Tensor:
    """Rows ``ids`` of the table whose block along ``name`` this rank holds (zeros for ids outside it:
    a partial lookup the layout sums over the ranks)."""
    if shards.count(name) == 1:
        return F.embedding(ids, table)
    rows = table.shape[0]
    offset = ids - shards.index(name) * rows
    inside = (offset >= 0) & (offset < rows)
    out = F.embedding(offset.masked_fill(~inside, 0), table)
    return out * inside.unsqueeze(-1).to(out.dtype)


def lookup(
    layout: Optional[Layout], table: Tensor, table_axes: Axes, ids: Tensor, ids_axes: Axes = ("batch", "seq")
) -> Tensor:
    """``table[ids]``: rows of a ``[rows, dim]`` table for integer inputs ``ids``; the result's dims
    are ``ids_axes + table_axes[1:]``."""
    if layout is None:
        return F.embedding(ids, table)
    name = table_axes[0]
    fn = lambda shards, table, ids: _rows(shards, table, ids, name)  # noqa: E731
    # inner: the one-hot [ids..., rows] the lookup contracts, so the ids and the rows never share an axis
    return layout.local(fn, [param(table, table_axes), data(ids, ids_axes)], [(*ids_axes, *table_axes[1:])],
                        inner=[(*ids_axes, name)], name=f"lookup {' '.join(table_axes)}")[0]


def _vocab_shard(shards: Shards, name: str, rows: int) -> Optional[VocabShard]:
    """This rank's block of the vocabulary (``rows`` of them) as the loss kernels take it."""
    n = shards.count(name)
    return None if n == 1 else VocabShard(shards.index(name) * rows, rows * n, shards.group(name))


def _planned(h: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """On ``meta`` tensors (planning a layout) a loss has a shape and no value."""
    return (h.new_zeros(()), h.new_zeros((), dtype=torch.float32)) if h.device.type == "meta" else None


def _loss_args(hidden: Arg, targets: Tensor, loss_mask: Optional[Tensor]) -> list[Arg]:
    tokens = hidden.axes[:-1]
    return [hidden, data(targets, tokens)] + ([] if loss_mask is None else [data(loss_mask, tokens)])


def linear_cross_entropy(
    layout: Optional[Layout],
    hidden: Tensor,
    hidden_axes: Axes,
    head: Tensor,
    head_axes: Axes,
    targets: Tensor,
    loss_mask: Optional[Tensor] = None,
    *,
    impl: Choice = "auto",
) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy over the valid targets, their total weight) of ``hidden`` through the
    ``[vocab, embed]`` ``head``: :func:`fastllm.nn.loss.linear_cross_entropy`, fused where ``impl``
    says. Under a layout each data rank's value is over its own rows, and with ``vocab`` split each
    rank holds a block of the logits (never all of them): the softmax statistics are summed over the
    block's group inside the loss."""
    if layout is None:
        return _linear_cross_entropy(hidden, head, targets, loss_mask=loss_mask, impl=impl)
    vocab = head_axes[0]

    def loss(shards: Shards, h: Tensor, w: Tensor, targets: Tensor, *mask: Tensor):
        return _planned(h) or _linear_cross_entropy(h, w, targets, loss_mask=mask[0] if mask else None,
                                                    shard=_vocab_shard(shards, vocab, w.shape[0]), impl=impl)

    args = _loss_args(activation(hidden, hidden_axes), targets, loss_mask)
    args.insert(1, param(head, head_axes))
    # inner: the logits [tokens, vocab]: vocab and the sequence never share a mesh axis
    return tuple(layout.local(loss, args, [(), ()], reduced=(vocab,), inner=[(*hidden_axes[:-1], vocab)],
                              keep=("batch",), name="linear cross-entropy"))


def cross_entropy(
    layout: Optional[Layout], logits: Tensor, logits_axes: Axes, targets: Tensor, loss_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy over the valid targets, their total weight) of ``logits`` whose last dim
    (``logits_axes[-1]``, the vocabulary) may be split: :func:`fastllm.nn.cross_entropy` on one device."""
    if layout is None:
        return _cross_entropy(logits, targets, loss_mask=loss_mask)
    vocab = logits_axes[-1]

    def loss(shards: Shards, logits: Tensor, targets: Tensor, *mask: Tensor):
        return _planned(logits) or _cross_entropy(logits, targets, loss_mask=mask[0] if mask else None,
                                                  shard=_vocab_shard(shards, vocab, logits.shape[-1]))

    args = _loss_args(activation(logits, logits_axes), targets, loss_mask)
    return tuple(layout.local(loss, args, [(), ()], reduced=(vocab,), keep=("batch",), name="cross-entropy"))
