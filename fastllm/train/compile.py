"""Per-block ``torch.compile`` for training, in torchtitan's order: tensor parallel, then
checkpointing, then compile, then data parallel.

One compiled callable serves every decoder block of a model: the blocks share their code and
shapes, and only their parameters (graph inputs) differ, so dynamo traces once
(``dynamic=False``) and every layer reuses the graph. Blocks whose declarations differ (a layer
with a sliding window beside full-attention layers) get one compiled callable per distinct
:class:`fastllm.nn.Block`. What stays outside the graph, and why:

* the ``params`` hook (ZeRO-3 gather, prefetch): :func:`fastllm.models.hidden_states` calls it
  eagerly before the block, as FSDP2 gathers outside a compiled layer; its asynchronous,
  stateful collectives are not traceable;
* ``remat``: ``torch.utils.checkpoint`` wraps the whole (gather + compiled block) call, so
  backward re-gathers and re-runs the compiled forward;
* the tensor-parallel hooks (``enter_parallel``/``exit_parallel``, autograd Functions around
  in-place c10d collectives) when the ``tensor`` axis has more than one rank: they run eagerly
  (``torch.compiler.disable``), so dynamo compiles the compute between them (a graph break at
  each hook). With one ``tensor`` rank the hooks are identities and are traced away.

Kernels: inside a compiled block the elementwise ops that a compiler fuses into its neighbours
(RMSNorm/LayerNorm, rotary, the MLP activation) use their pure-torch references rather than
the Triton kernels (opaque to inductor, and each a fusion barrier); attention keeps its choice
(SDPA/FlexAttention are traced natively) and so does MoE. Dynamo cannot trace beartype's checks,
so run compiled blocks with ``FASTLLM_TYPECHECK=0`` (the default outside the test suite).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

import torch
from torch import Tensor

from fastllm import nn
from fastllm.nn.layout import Layout

__all__ = ["CompiledBlocks", "FUSED_BY_COMPILE"]

FUSED_BY_COMPILE = ("rms_norm", "layer_norm", "rotary", "activation")  # kernels set to "torch" inside


class CompiledBlocks:
    """A drop-in for :func:`fastllm.nn.block.apply` (the ``block_fn`` of
    :func:`fastllm.models.hidden_states`) that runs each block through ``torch.compile``.

    ``backend``: ``"inductor"`` to train; ``"aot_eager"`` traces forward and backward graphs
    without code generation (tests).
    """

    def __init__(self, backend: str = "inductor"):
        if os.environ.get("FASTLLM_TYPECHECK", "0") == "1":
            raise RuntimeError("compiled blocks need FASTLLM_TYPECHECK=0: dynamo cannot trace the beartype "
                               "checks that FASTLLM_TYPECHECK=1 wraps around every fastllm function")
        self.backend = backend
        self._compiled: dict[nn.Block, Any] = {}
        self._layout: Optional[Layout] = None
        self._hooks: Optional[Layout] = None

    def __call__(
        self,
        layer: nn.Block,
        p: dict,
        x: Tensor,
        *,
        rope: Optional[tuple[Tensor, Tensor]] = None,
        segment_ids: Optional[Tensor] = None,
        layout: Optional[Layout] = None,
        cache: Optional[nn.attention.KVCache] = None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        if cache is not None:
            raise ValueError("compiled blocks are for training: decode with a KV cache eagerly (no block_fn)")
        return self._for(layer)(p, x, rope, segment_ids, self._traceable(layout))

    def _for(self, layer: nn.Block):
        if layer not in self._compiled:
            fn = functools.partial(_apply, _reference_elementwise(layer))
            self._compiled[layer] = torch.compile(fn, backend=self.backend, dynamic=False)
        return self._compiled[layer]

    def _traceable(self, layout: Optional[Layout]) -> Optional[Layout]:
        """``layout`` itself when its activation hooks are identities, else a view whose tensor-parallel
        hooks run eagerly (kept, one per layout, so dynamo's guards see the same object every call)."""
        if layout is None or _tensor_ranks(layout) == 1:
            return layout
        if layout is not self._layout:
            self._layout, self._hooks = layout, _EagerHooks(layout)
        return self._hooks


def _apply(layer, p, x, rope, segment_ids, layout):
    return nn.block.apply(layer, p, x, rope=rope, segment_ids=segment_ids, layout=layout)


def _reference_elementwise(layer: nn.Block) -> nn.Block:
    """``layer`` with the kernels in :data:`FUSED_BY_COMPILE` set to the torch references."""
    def with_references(part):
        return dataclasses.replace(part, kernels=part.kernels.replace(**{op: "torch" for op in FUSED_BY_COMPILE}))

    return dataclasses.replace(with_references(layer), attention=with_references(layer.attention),
                               ffn=with_references(layer.ffn))


def _tensor_ranks(layout: Layout) -> Optional[int]:
    """Ranks along ``tensor`` of a mesh layout; ``None`` (unknown: treat the hooks as collectives)."""
    mesh = getattr(layout, "mesh", None)
    return None if mesh is None else mesh.size("tensor")


@torch.compiler.disable
def _eager(method: str, layout: Layout, *args):
    return getattr(layout, method)(*args)


class _EagerHooks:
    """``layout`` with its in-block activation hooks outside the compiled graph (graph breaks)."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def params(self, path: str, p: Any) -> Any:
        return _eager("params", self.layout, path, p)

    def local_seq(self, x: Tensor) -> Tensor:
        return _eager("local_seq", self.layout, x)

    def enter_parallel(self, x: Tensor) -> Tensor:
        return _eager("enter_parallel", self.layout, x)

    def exit_parallel(self, y: Tensor) -> Tensor:
        return _eager("exit_parallel", self.layout, y)
