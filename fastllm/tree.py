"""Pytree helpers over optree: paths, flat dotted views, and partition/combine by predicate.

Parameters, gradients, optimizer state and axis names are all pytrees of the same structure:
nested ``dict`` (string keys) and ``list`` containers with tensors (or axis tuples) at the leaves.
A leaf's *path* is its dotted key, e.g. ``"layers.3.attention.wq"``; checkpoints, Hugging Face
conversion and sharding rules all speak in these paths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree

__all__ = [
    "PyTree",
    "map",
    "map_with_path",
    "leaves",
    "leaves_with_path",
    "with_leaves",
    "flatten",
    "unflatten",
    "partition",
    "combine",
    "is_axes",
    "Keys",
    "get",
    "dotted",
]

Keys = tuple  # a key path into a tree: ("layers", 3) or ("embed", "tokens")

PyTree = Any


def is_axes(node: Any) -> bool:
    """True for a tuple of axis names, which is a leaf of an axes tree (not a container)."""
    return isinstance(node, tuple) and all(isinstance(name, (str, type(None))) for name in node)


def map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree, is_leaf=None) -> PyTree:  # noqa: A001
    """``fn`` applied leaf by leaf over trees of the same structure."""
    return optree.tree_map(fn, tree, *rest, is_leaf=is_leaf, none_is_leaf=False)


def _key_name(part: Any) -> str:
    # Under torch.compile, dynamo swaps optree's path functions for torch.utils._pytree's, whose
    # path entries are MappingKey(key=...) / SequenceKey(idx=...) objects rather than raw keys.
    for attribute in ("key", "idx"):
        if hasattr(part, attribute) and not isinstance(part, (str, int)):
            return str(getattr(part, attribute))
    return str(part)


def _dotted(path: tuple) -> str:
    return ".".join(_key_name(part) for part in path)


def dotted(keys: Keys) -> str:
    """The dotted path of a key path: ``("layers", 3, "mlp")`` -> ``"layers.3.mlp"``."""
    return _dotted(tuple(keys))


def get(tree: PyTree, keys: Keys) -> PyTree:
    """The subtree (or leaf) of ``tree`` at the key path ``keys``."""
    node = tree
    for key in keys:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            raise KeyError(f"no subtree at {dotted(keys)!r} (missing {key!r})") from None
    return node


def map_with_path(fn: Callable[..., Any], tree: PyTree, *rest: PyTree, is_leaf=None) -> PyTree:
    """``fn(path, leaf, *other_leaves)`` over every leaf; ``path`` is the dotted key string."""
    return optree.tree_map_with_path(
        lambda path, *leafs: fn(_dotted(path), *leafs), tree, *rest, is_leaf=is_leaf
    )


def leaves(tree: PyTree, is_leaf=None) -> list[Any]:
    return optree.tree_leaves(tree, is_leaf=is_leaf)


def with_leaves(structure: PyTree, new_leaves: list[Any]) -> PyTree:
    """A tree shaped like ``structure`` holding ``new_leaves`` (in :func:`leaves` order)."""
    return optree.tree_unflatten(optree.tree_structure(structure), list(new_leaves))


def leaves_with_path(tree: PyTree, is_leaf=None) -> list[tuple[str, Any]]:
    paths, values, _ = optree.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(_dotted(path), value) for path, value in zip(paths, values)]


def flatten(tree: PyTree, is_leaf=None) -> dict[str, Any]:
    """``{"a.b.c": leaf}``: the flat view used by checkpoints and converters."""
    flat = {}
    for path, value in leaves_with_path(tree, is_leaf=is_leaf):
        if path in flat:
            raise ValueError(f"two leaves share the dotted path {path!r}")
        flat[path] = value
    return flat


def _as_list_if_indexed(node: dict) -> dict | list:
    keys = list(node)
    if keys and all(k.isdigit() for k in keys) and sorted(int(k) for k in keys) == list(range(len(keys))):
        return [node[str(i)] for i in range(len(keys))]
    return node


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    return _as_list_if_indexed({k: _listify(v) for k, v in node.items()})


def unflatten(flat: dict[str, Any]) -> PyTree:
    """Inverse of :func:`flatten`: dotted keys become nested dicts; levels keyed 0..n-1 become lists."""
    root: dict = {}
    for path, value in flat.items():
        *parents, last = path.split(".")
        node = root
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"path {path!r} nests under the leaf {part!r}")
            node = child
        if last in node:
            raise ValueError(f"duplicate path {path!r}")
        node[last] = value
    return _listify(root)


def partition(tree: PyTree, predicate: Callable[[str, Any], bool]) -> tuple[PyTree, PyTree]:
    """Split into (selected, rest) of the same structure, ``None`` in the holes (equinox style).

    ``predicate(path, leaf)`` picks the selected leaves; :func:`combine` puts them back together.
    """
    selected = map_with_path(lambda p, x: x if predicate(p, x) else None, tree)
    rest = map_with_path(lambda p, x: None if predicate(p, x) else x, tree)
    return selected, rest


def combine(*trees: PyTree) -> PyTree:
    """Merge partitions: at each leaf position take the first tree's non-``None`` value."""

    def first_present(*values):
        for value in values:
            if value is not None:
                return value
        return None

    return optree.tree_map(first_present, *trees, none_is_leaf=True)
