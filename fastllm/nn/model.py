"""The model contract: a model is its parameter declarations and the ordered parts that use them.

    model = Model(declarations, parts)
    carry = run(model, params, batch)            # {"loss": ..., other metrics}

Each :class:`Part` is one unit the model runs (the embedding, each block, the head and loss): the
subtrees of the params it uses, named by key paths, and ``fn(static, params, carry, batch, layout)``
which returns the new carry (a dict of tensors: the residual stream, and whatever later parts
need). The last part's carry holds ``"loss"`` (the scalar to differentiate) and any other scalar
metrics. A part along the model's ``layers`` dim says its index (``layer``): such parts are the
repeated units, the ones recomputed in backward (remat), compiled once for all, and dealt to
pipeline stages by the ``layers`` rule.

Everything that runs a model for training reads this declaration and nothing else: ZeRO-3
gathers each part's parameters just before it runs (and prefetches the next), gradients are
reduced in buckets in reverse part order, and no code parses parameter paths. A model without a
finer declaration is one part that uses the whole tree: it trains on any layout, only without
per-part overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor

from fastllm import tree
from fastllm.nn import param as _param

__all__ = ["Part", "Model", "run", "part_params", "single_part", "PartFn"]

# fn(static, params (one subtree per key path), carry, batch, layout) -> carry
PartFn = Callable[..., dict[str, Tensor]]


@dataclass(frozen=True)
class Part:
    """One unit of a model: its name, the key paths of the subtrees it uses, and its function."""

    name: str
    params: Sequence[tree.Keys]  # stored as a tuple of tuples
    fn: PartFn
    static: Hashable = None  # the part's own frozen config, handed to fn (and the compile cache key)
    layer: Optional[int] = None  # its index along the model's `layers` dim (a repeated unit), if any

    def __post_init__(self):
        object.__setattr__(self, "params", tuple(tuple(keys) for keys in self.params))


@dataclass(frozen=True)
class Model:
    """What the Trainer, the partitioner and checkpoints need of a model.

    ``declarations``: the tree of :class:`fastllm.nn.Param`; ``parts``: in the order they run;
    ``flops_per_token(seq_len)``: the training FLOPs per token (6 N + attention) for MFU, ``None``
    if unknown; ``config``: the model's own config, for whoever saves or exports it.
    """

    declarations: Any
    parts: Sequence[Part]  # stored as a tuple
    flops_per_token: Optional[Callable[[int], float]] = None
    config: Any = None
    layer_dim: str = field(default="layers")  # the logical name of the repeated parts' dim

    def __post_init__(self):
        object.__setattr__(self, "parts", tuple(self.parts))
        if not self.parts:
            raise ValueError("a model needs at least one part")
        names = [part.name for part in self.parts]
        if len(set(names)) != len(names):
            raise ValueError(f"part names must be unique, got {names}")
        leaves = tree.flatten(self.declarations, is_leaf=_param.is_param)
        used = set()
        for part in self.parts:
            for keys in part.params:
                prefix = tree.dotted(keys)
                found = [p for p in leaves if p == prefix or p.startswith(prefix + ".")]
                if not found:
                    raise ValueError(f"part {part.name!r} uses {prefix!r}, which declares no parameter")
                used.update(found)
        unused = sorted(set(leaves) - used)
        if unused:
            raise ValueError(f"parameters {unused[:3]}{'...' if len(unused) > 3 else ''} belong to no part")

    def leaves_of(self, part: Part) -> list[str]:
        """The dotted paths of the parameter leaves ``part`` uses, in declaration order."""
        prefixes = [tree.dotted(keys) for keys in part.params]
        return [p for p in tree.flatten(self.declarations, is_leaf=_param.is_param)
                if any(p == prefix or p.startswith(prefix + ".") for prefix in prefixes)]


def part_params(part: Part, params: Any) -> tuple:
    """The subtrees of ``params`` that ``part`` uses, in its order."""
    return tuple(tree.get(params, keys) for keys in part.params)


def run(model: Model, params: Any, batch: dict[str, Tensor], *, layout: Any = None,
        call: Optional[Callable[..., dict[str, Tensor]]] = None) -> dict[str, Tensor]:
    """The parts one after the other on ``batch``; the last carry. ``call(index, part, params,
    carry, batch, layout)`` runs one part in place of the plain ``part.fn`` (training wraps it:
    gathering, recomputation, compilation)."""
    carry: dict[str, Tensor] = {}
    for index, part in enumerate(model.parts):
        if call is None:
            carry = part.fn(part.static, part_params(part, params), carry, batch, layout)
        else:
            carry = call(index, part, params, carry, batch, layout)
    if "loss" not in carry:
        raise ValueError(f"the last part of the model returned no 'loss' (carry keys: {sorted(carry)})")
    return carry


def single_part(declarations: dict, loss: Callable[..., Any], **model_fields: Any) -> Model:
    """A one-part model from ``loss(params, batch, layout) -> loss`` (or ``(loss, metrics)``): the
    whole tree in one part (ZeRO-3 gathers it at once; no per-part overlap). For quick experiments."""
    if not isinstance(declarations, dict):
        raise TypeError("single_part needs a dict of declarations at the top level")
    names = tuple(declarations)

    def fn(static, subtrees, carry, batch, layout):
        out = loss(dict(zip(names, subtrees)), batch, layout)
        value, metrics = out if isinstance(out, tuple) else (out, {})
        return {**metrics, "loss": value}

    return Model(declarations, (Part("model", tuple((name,) for name in names), fn),), **model_fields)
