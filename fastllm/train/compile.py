"""Per-part ``torch.compile`` for training, in torchtitan's order: tensor parallel, then
checkpointing, then compile, then data parallel.

One compiled callable serves every repeated part of a model (the parts along ``layers``, each a
decoder block): they share their code and shapes, and only their parameters (graph inputs)
differ, so dynamo traces once (``dynamic=False``) and every layer reuses the graph. Parts whose
static configs differ (a layer with a sliding window beside full-attention layers) get one
compiled callable per distinct ``(fn, static)``. What stays outside the graph, and why:

* the ZeRO-3 gather and its prefetch: the step runs them eagerly before the part, as FSDP2
  gathers outside a compiled layer; their asynchronous, stateful collectives are not traceable;
* ``remat``: ``torch.utils.checkpoint`` wraps the whole (gather + compiled part) call, so
  backward re-gathers and re-runs the compiled forward;
* the layout's collectives when the ``tensor`` axis has several ranks:
  :func:`fastllm.sharding.placement.relayout` is ``torch.compiler.disable``d, so dynamo compiles
  the compute between them (a graph break at each). With one ``tensor`` rank the layout is
  ``None`` and nothing breaks the graph;
* FlexAttention's block masks of packed documents: built (or found in the kernel's cache) before
  the part and read inside as graph inputs (:func:`fastllm.kernels.attention.prepared_block_masks`).
  Looked up from inside, the cache is Python that dynamo cannot trace: a graph break in every block.

Kernels: inside a compiled part the elementwise ops that a compiler fuses into its neighbours
(RMSNorm/LayerNorm, rotary, the MLP activation) use their pure-torch references rather than the
Triton kernels (opaque to inductor, and each a fusion barrier): every
:class:`fastllm.kernels.KernelConfig` inside the part's static config is switched for those ops.
Attention keeps its choice (SDPA/FlexAttention are traced natively) and so does MoE. Dynamo cannot
trace beartype's checks, so run compiled parts with ``FASTLLM_TYPECHECK=0`` (the default outside
the test suite).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any

import torch

from fastllm import nn
from fastllm.kernels import KernelConfig, select
from fastllm.kernels.attention import prepared_block_masks

__all__ = ["CompiledParts", "FUSED_BY_COMPILE"]

FUSED_BY_COMPILE = ("rms_norm", "layer_norm", "rotary", "activation")  # kernels set to "torch" inside


class CompiledParts:
    """``compiled(part)``: a ``torch.compile``d function with ``part.fn``'s signature, shared by every
    part with the same ``(fn, static)``. ``backend``: ``"inductor"`` to train; ``"aot_eager"`` traces
    forward and backward graphs without code generation (tests)."""

    def __init__(self, backend: str = "inductor"):
        if os.environ.get("FASTLLM_TYPECHECK", "0") == "1":
            raise RuntimeError("compiled parts need FASTLLM_TYPECHECK=0: dynamo cannot trace the beartype "
                               "checks that FASTLLM_TYPECHECK=1 wraps around every fastllm function")
        self.backend = backend
        self._compiled: dict[tuple, Any] = {}

    def __call__(self, part: nn.Part):
        key = (part.fn, part.static)
        if key not in self._compiled:
            fn = functools.partial(_call, part.fn)
            compiled = torch.compile(fn, backend=self.backend, dynamic=False)
            static = _reference_elementwise(part.static)
            attentions = _instances(static, nn.Attention)

            def run(_static, params, carry, batch, layout):
                with _nested_graph_breaks(), _block_masks(attentions, batch):
                    return compiled(static, params, carry, batch, layout)

            self._compiled[key] = run
        return self._compiled[key]


def _nested_graph_breaks():
    """Dynamo resumes tracing inside the nested frame where a graph break happens, where the torch
    version can. Breaks happen deep inside a part (part -> block -> attention -> the named-dim
    ``local`` -> the kernel): the tensor-parallel collectives, run eagerly. Without this, a break
    bubbles up to the part and every frame on the way is split into its own graph, each boundary a
    fusion barrier and a saved activation (docs/performance.md)."""
    if hasattr(torch._dynamo.config, "nested_graph_breaks"):
        return torch._dynamo.config.patch(nested_graph_breaks=True)
    return contextlib.nullcontext()


def _block_masks(attentions: list, batch: Any):
    """FlexAttention's block masks of the batch's packed documents, built before the compiled part
    (see :func:`fastllm.kernels.attention.prepared_block_masks`), so the part stays one graph."""
    segment_ids = batch.get("segment_ids") if isinstance(batch, dict) else None
    if segment_ids is None:
        return contextlib.nullcontext()
    windows = {layer.window for layer in attentions
               if select(layer.kernels, "attention", segment_ids.device) == "triton"}
    return prepared_block_masks(segment_ids, windows)


def _instances(static: Any, cls: type) -> list:
    """The instances of ``cls`` in ``static`` and its nested dataclasses."""
    if isinstance(static, cls):
        return [static]
    if not dataclasses.is_dataclass(static) or isinstance(static, type):
        return []
    return [found for f in dataclasses.fields(static) for found in _instances(getattr(static, f.name), cls)]


def _call(fn, static, params, carry, batch, layout):
    return fn(static, params, carry, batch, layout)


def _reference_elementwise(static: Any) -> Any:
    """``static`` with the ops of :data:`FUSED_BY_COMPILE` set to the torch references in every
    :class:`KernelConfig` it holds (nested frozen dataclasses included)."""
    if isinstance(static, KernelConfig):
        return static.replace(**{op: "torch" for op in FUSED_BY_COMPILE})
    if not dataclasses.is_dataclass(static) or isinstance(static, type):
        return static
    changes = {f.name: _reference_elementwise(getattr(static, f.name)) for f in dataclasses.fields(static)}
    changes = {name: value for name, value in changes.items() if value is not getattr(static, name)}
    return dataclasses.replace(static, **changes) if changes else static
