"""Shared type aliases. Shapes use jaxtyping; a runtime checker enforces them when enabled.

Set ``FASTLLM_TYPECHECK=1`` before importing fastllm (the test suite does) and every annotated
function of the package is checked with beartype through jaxtyping's import hook. Without it the
annotations are plain metadata and cost nothing.
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["Params", "Axes", "AxesTree", "Tokens", "Positions", "Logits", "Hidden", "Tensor"]

Params = Any  # nested dict/list of tensors
Axes = tuple  # logical dimension names of one parameter, e.g. ("embed", "vocab")
AxesTree = Any  # the params tree with an Axes tuple at each leaf
Tokens = Int[Tensor, "batch seq"]
Positions = Int[Tensor, "batch seq"]
SegmentIds = Int[Tensor, "batch seq"]
Logits = Float[Tensor, "batch seq vocab"]
Hidden = Float[Tensor, "batch seq embed"]
Mask = Bool[Tensor, "batch seq"]
