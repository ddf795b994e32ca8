"""Activation layout hooks: where a parallel layout may act inside single-device model code.

Model code never mentions ranks. It calls these helpers at the few points where Megatron-LM
(Shoeybi et al. 2019; Korthikanti et al. 2022 for sequence parallelism) places its collectives,
passing an optional ``layout``. With ``layout=None`` (one device) each helper is the plain
single-device computation, at no cost. A layout object (built by ``fastllm.sharding``) implements
the :class:`Layout` protocol:

=======================  ===================================================================
hook                     called
=======================  ===================================================================
``params(path, p)``      before a part of the model uses its params (``"embed"``,
                         ``"layers.3"``, ``"final_norm"``, ``"lm_head"``): ZeRO-3 gathers them
``embed(table, ids)``    token lookup in a (vocab-sharded) table; returns the residual stream
``local_seq(x)``         this rank's part of a per-token tensor ``[batch, seq, ...]`` in the
                         residual stream's layout (sequence parallel: a block of ``seq``)
``enter_parallel(x)``    residual stream -> the input of a column-parallel matmul
``exit_parallel(y)``     partial sums of a row-parallel matmul -> the residual stream
``cross_entropy(...)``   the loss of (vocab-sharded) logits, as :func:`fastllm.nn.cross_entropy`
``linear_cross_entropy`` the LM head and its loss from the residual stream, as
                         :func:`fastllm.nn.loss.linear_cross_entropy` (fused where ``impl`` says)
=======================  ===================================================================
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

import torch.nn.functional as F
from torch import Tensor

from fastllm.kernels import Choice
from fastllm.nn.loss import cross_entropy as _cross_entropy
from fastllm.nn.loss import linear_cross_entropy as _linear_cross_entropy

__all__ = [
    "Layout",
    "params",
    "embed",
    "local_seq",
    "enter_parallel",
    "exit_parallel",
    "row_parallel_linear",
    "cross_entropy",
    "linear_cross_entropy",
]


@runtime_checkable
class Layout(Protocol):
    def params(self, path: str, p: Any) -> Any: ...

    def embed(self, table: Tensor, ids: Tensor) -> Tensor: ...

    def local_seq(self, x: Tensor) -> Tensor: ...

    def enter_parallel(self, x: Tensor) -> Tensor: ...

    def exit_parallel(self, y: Tensor) -> Tensor: ...

    def cross_entropy(
        self, logits: Tensor, targets: Tensor, loss_mask: Optional[Tensor]
    ) -> tuple[Tensor, Tensor]: ...

    def linear_cross_entropy(
        self, hidden: Tensor, head: Tensor, targets: Tensor, loss_mask: Optional[Tensor], impl: Choice
    ) -> tuple[Tensor, Tensor]: ...


def params(layout: Optional[Layout], path: str, p: Any) -> Any:
    return p if layout is None else layout.params(path, p)


def embed(layout: Optional[Layout], table: Tensor, ids: Tensor) -> Tensor:
    return F.embedding(ids, table) if layout is None else layout.embed(table, ids)


def local_seq(layout: Optional[Layout], x: Tensor) -> Tensor:
    return x if layout is None else layout.local_seq(x)


def enter_parallel(layout: Optional[Layout], x: Tensor) -> Tensor:
    return x if layout is None else layout.enter_parallel(x)


def exit_parallel(layout: Optional[Layout], y: Tensor) -> Tensor:
    return y if layout is None else layout.exit_parallel(y)


def row_parallel_linear(
    layout: Optional[Layout], x: Tensor, w: Tensor, b: Optional[Tensor] = None
) -> Tensor:
    """``x W^T + b`` where ``W``'s input dim may be sharded: the bias joins after the partial sums
    are combined (added on every rank before the sum it would count once per rank)."""
    if layout is None:
        return F.linear(x, w, b)
    y = layout.exit_parallel(F.linear(x, w))
    return y if b is None else y + b


def cross_entropy(
    layout: Optional[Layout], logits: Tensor, targets: Tensor, loss_mask: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    if layout is None:
        return _cross_entropy(logits, targets, loss_mask=loss_mask)
    return layout.cross_entropy(logits, targets, loss_mask)


def linear_cross_entropy(
    layout: Optional[Layout],
    hidden: Tensor,
    head: Tensor,
    targets: Tensor,
    loss_mask: Optional[Tensor] = None,
    *,
    impl: Choice = "auto",
) -> tuple[Tensor, Tensor]:
    """(loss, valid weight) of ``hidden`` (the residual stream) through the (vocab-sharded) head."""
    if layout is None:
        return _linear_cross_entropy(hidden, head, targets, loss_mask=loss_mask, impl=impl)
    return layout.linear_cross_entropy(hidden, head, targets, loss_mask, impl)
