"""Weight-name rules between a Hugging Face state dict and the fastllm parameter tree.

A :class:`Rule` ties a few Hugging Face tensors to a few of our leaves with a pair of pure
functions, one per direction. Most rules are one-to-one reshapes (``q_proj.weight`` [heads*head_dim,
embed] <-> ``wq`` [heads, head_dim, embed]); fused tensors (GPT-2's ``c_attn``, Mixtral's
``gate_up_proj``) are one-to-many. Applying the rules both ways is the whole converter, and it reports
every missing and every unexpected name at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Sequence

import torch

from fastllm.errors import UserError

__all__ = ["Rule", "rename", "heads_in", "heads_out", "transposed", "load_tensors", "save_tensors"]

Fn = Callable[..., Sequence[torch.Tensor]]


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]  # Hugging Face state-dict names
    ours: tuple[str, ...]  # our dotted parameter paths
    to_ours: Fn  # hf tensors -> our tensors (same order as ``ours``)
    to_hf: Fn  # our tensors -> hf tensors (same order as ``hf``)


def rename(hf: str, ours: str) -> Rule:
    """Same tensor under another name."""
    return Rule((hf,), (ours,), lambda t: (t,), lambda t: (t,))


def heads_in(hf: str, ours: str, heads: int, head_dim: int) -> Rule:
    """A projection into heads: HF [heads*head_dim, ...] <-> ours [heads, head_dim, ...] (weight or bias)."""
    return Rule((hf,), (ours,),
                lambda t: (t.reshape(heads, head_dim, *t.shape[1:]),),
                lambda t: (t.reshape(heads * head_dim, *t.shape[2:]),))


def heads_out(hf: str, ours: str, heads: int, head_dim: int) -> Rule:
    """The output projection: HF [embed, heads*head_dim] <-> ours [embed, heads, head_dim]."""
    return Rule((hf,), (ours,),
                lambda t: (t.reshape(t.shape[0], heads, head_dim),),
                lambda t: (t.reshape(t.shape[0], heads * head_dim),))


def transposed(hf: str, ours: str) -> Rule:
    """GPT-2's Conv1D stores [in, out]; we store torch's [out, in]."""
    return Rule((hf,), (ours,), lambda t: (t.t(),), lambda t: (t.t(),))


def load_tensors(rules: list[Rule], get: Callable[[str], torch.Tensor], available: set[str],
                 ignored: Callable[[str], bool], source: str) -> dict[str, torch.Tensor]:
    """Our flat ``{path: tensor}`` from HF tensors; every missing or unexpected HF name is an error."""
    missing = [name for rule in rules for name in rule.hf if name not in available]
    used = {name for rule in rules for name in rule.hf}
    unexpected = sorted(name for name in available if name not in used and not ignored(name))
    _require_match(f"{source}: checkpoint does not match the config", missing, unexpected)
    flat = {}
    for rule in rules:
        inputs = [get(name) for name in rule.hf]
        flat.update(zip(rule.ours, _run(rule.to_ours, inputs, rule.hf, rule.ours, source)))
    return flat


def save_tensors(rules: list[Rule], flat: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """HF ``{name: tensor}`` from our flat params; missing or extra leaves are an error."""
    needed = [path for rule in rules for path in rule.ours]
    missing = [path for path in needed if path not in flat]
    unexpected = sorted(set(flat) - set(needed))
    _require_match(f"{source}: params do not match the config", missing, unexpected)
    tensors = {}
    for rule in rules:
        outputs = _run(rule.to_hf, [flat[path] for path in rule.ours], rule.ours, rule.hf, source)
        tensors.update(zip(rule.hf, (t.contiguous() for t in outputs)))
    return tensors


def _require_match(what: str, missing: list[str], unexpected: list[str]) -> None:
    """One error naming every missing and every unexpected name."""
    if missing or unexpected:
        raise UserError(f"{what}: missing {missing or 'nothing'}; unexpected {unexpected or 'nothing'}")


def _run(fn: Fn, inputs: list[torch.Tensor], names: tuple[str, ...], targets: tuple[str, ...],
         source: str) -> Sequence[torch.Tensor]:
    """A rule's reshapes, with a shape error turned into one that names the tensors."""
    try:
        return fn(*inputs)
    except RuntimeError as error:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, inputs))
        raise UserError(f"{source}: cannot convert {shapes} into {list(targets)}: {error}") from None
