"""The optimizer contract (optax style): a transformation is a pair of pure functions.

    state = transform.init(params)
    updates, state = transform.update(grads, state, params)
    params = apply_updates(params, updates)

or, in one call that uses the transform's fused kernel when it has one (``adamw`` does):

    params, state = apply_gradients(transform, grads, state, params)

``updates`` enter as gradients and leave as the *deltas* to add to the parameters (the learning-rate
transform negates). State is a NamedTuple whose tensor fields are either 0-d scalars (step counts,
norms) or whole pytrees with the structure of ``params`` (moments), so :func:`state_axes` can give
every state leaf the logical axes of its parameter and the state can be sharded like the params.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import optree
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from fastllm import tree
from fastllm.kernels.registry import KernelConfig
from fastllm.optim import _multi
from fastllm.tree import PyTree

__all__ = [
    "GradientTransformation",
    "EmptyState",
    "chain",
    "apply_updates",
    "apply_gradients",
    "global_norm",
    "cast_tree",
    "select_tree",
    "get_state",
    "state_axes",
]

# Optional hook that sums a local 0-d value over the ranks holding shards of a tree (all-reduce).
Reduce = Optional[Callable[[Tensor], Tensor]]


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(updates, state, params=None) -> (updates, state)``.

    ``fused`` (optional): ``fused(grads, state, params, *, kernels, grad_scale, apply, model_copy)``
    does ``update`` and ``apply_updates`` in one pass, writing the new params and state tensors IN
    PLACE (and the new params, rounded, into ``model_copy`` when given), and returns ``(params,
    state)``, a state equal in structure and meaning to ``update``'s (the old values where the 0-d
    bool ``apply`` is False); or ``None`` (having changed nothing) when it cannot take these leaves.
    See :func:`apply_gradients`.
    """

    init: Callable[[PyTree], Any]
    update: Callable[..., tuple[PyTree, Any]]
    fused: Optional[Callable[..., Optional[tuple[PyTree, Any]]]] = None


class EmptyState(NamedTuple):
    """The state of a stateless transformation."""


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after the other; the state is the tuple of their states."""

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None):
        if len(state) != len(transforms):
            raise ValueError(f"chain of {len(transforms)} transforms got a state of length {len(state)}")
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``params + updates`` leaf by leaf, each update cast to its parameter's dtype."""
    leaves, spec = optree.tree_flatten(params)
    if not leaves:
        return params
    deltas = [u if u.dtype == p.dtype else u.to(p.dtype) for p, u in zip(leaves, tree.leaves(updates))]
    return optree.tree_unflatten(spec, _multi.add(leaves, deltas))


def apply_gradients(
    transform: GradientTransformation,
    grads: PyTree,
    state: Any,
    params: PyTree,
    *,
    kernels: Optional[KernelConfig] = None,
    grad_scale: Optional[Tensor] = None,
    apply: Optional[Tensor] = None,
    model_copy: Optional[PyTree] = None,
) -> tuple[PyTree, Any]:
    """One optimizer step: ``(new params, new state)`` from the gradients.

    With ``transform.fused`` the params and the state's moments are updated in place by one fused
    kernel pass: the caller DONATES ``params`` and ``state`` (their tensors hold the new values
    afterwards; do not keep them as "the previous step"). Otherwise, or when the fused path
    declines these leaves, ``update`` then ``apply_updates``, out of place. ``grad_scale``: a 0-d
    factor applied to ``grads`` first (a clipping factor computed by the caller); ``kernels``:
    Triton or the torch reference for the fused path (fields ``adamw`` and ``grad_norm``).
    ``apply``: a 0-d bool tensor; False returns ``params`` and ``state`` with their old values (a
    skipped step, e.g. a non-finite gradient), decided on the device. ``model_copy``: a tree like
    ``params`` in a narrower dtype (mixed precision's compute copy), overwritten with the new params
    rounded to it: by the fused pass itself, else by a cast afterwards.
    """
    if transform.fused is not None:
        done = transform.fused(grads, state, params, kernels=kernels, grad_scale=grad_scale, apply=apply,
                               model_copy=model_copy)
        if done is not None:
            return done
    if grad_scale is not None and tree.leaves(grads):
        grads = tree.with_leaves(grads, _multi.mul(tree.leaves(grads), grad_scale))
    updates, new_state = transform.update(grads, state, params)
    new_params = apply_updates(params, updates)
    if apply is not None:
        new_params, new_state = select_tree(apply, (new_params, new_state), (params, state))
    if model_copy is not None:
        with torch.no_grad():
            torch._foreach_copy_(tree.leaves(model_copy), tree.leaves(new_params))
    return new_params, new_state


def global_norm(updates: PyTree, reduce: Reduce = None) -> Float[Tensor, ""]:
    """sqrt(sum of squares of every element), in float32, as a 0-d tensor (no host sync).

    With sharded leaves pass ``reduce`` (e.g. an all-reduce over the shard group): it receives the
    local sum of squares.
    """
    leaves = tree.leaves(updates)
    if not leaves:
        return torch.zeros((), dtype=torch.float32)
    squares = torch.stack(_multi.norms(leaves)).square().sum()
    if reduce is not None:
        squares = reduce(squares)
    return squares.sqrt()


def cast_tree(values: PyTree, dtype: torch.dtype) -> PyTree:
    """Floating-point tensors cast to ``dtype``; integer tensors and Python scalars untouched.

    Mixed precision: the trainer keeps fp32 master params and optimizer state, and runs the model
    on ``cast_tree(params, torch.bfloat16)``; gradients flow back to the fp32 masters.
    """

    def cast(x):
        return x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point() else x

    return tree.map(cast, values)


def select_tree(pred: Bool[Tensor, ""], on_true: PyTree, on_false: PyTree) -> PyTree:
    """``torch.where(pred, a, b)`` leaf by leaf: skip a step without reading ``pred`` on the host.

    Non-tensor leaves (Python numbers) must agree in both trees, since choosing between them
    would need the value of ``pred`` on the host.
    """

    def pick(path, a, b):
        if isinstance(a, Tensor):
            return torch.where(pred, a, b)
        if a != b:
            raise ValueError(f"select_tree: Python leaf {path!r} differs ({a!r} vs {b!r})")
        return a

    return tree.map_with_path(pick, on_true, on_false)


def get_state(state: Any, kind: type) -> Any:
    """The first state of type ``kind`` inside a (nested) chain state, e.g. the clipping norm."""
    if isinstance(state, kind):
        return state
    if isinstance(state, tuple):
        for child in state:
            found = get_state(child, kind)
            if found is not None:
                return found
    return None


def state_axes(state: Any, params_axes: PyTree) -> Any:
    """The optimizer state with logical axes at each leaf: a param-shaped subtree gets
    ``params_axes`` and a 0-d scalar gets ``()`` (replicated). Feed it to the sharding rules."""
    params_spec = optree.tree_structure(params_axes, is_leaf=tree.is_axes)
    if params_spec.num_leaves == 1 and params_spec.num_nodes == 1:
        raise ValueError("state_axes needs params in a container (dict or list), not a bare leaf")

    def walk(node, where):
        if not isinstance(node, Tensor) and optree.tree_structure(node) == params_spec:
            return params_axes
        if isinstance(node, Tensor):
            if node.ndim != 0:
                raise ValueError(f"state leaf {where} of shape {tuple(node.shape)} is neither a "
                                 "0-d scalar nor part of a params-shaped tree")
            return ()
        if isinstance(node, (bool, int, float)):
            return ()
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(walk(c, f"{where}.{f}") for f, c in zip(node._fields, node)))
        if isinstance(node, (tuple, list)):
            return type(node)(walk(c, f"{where}.{i}") for i, c in enumerate(node))
        if isinstance(node, dict):
            return {k: walk(v, f"{where}.{k}") for k, v in node.items()}
        raise TypeError(f"state leaf {where} has unsupported type {type(node).__name__}")

    return walk(state, "state")
