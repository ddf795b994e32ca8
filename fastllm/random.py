"""Explicit random keys, JAX style, on top of ``torch.Generator``.

A key is a seed plus a path of names. ``fold_in`` extends the path; the random stream of a key is
a pure function of (seed, path), hashed into a 64-bit generator seed. A parameter's initial value
is drawn from the key folded with its dotted path, so it depends neither on the order in which
parameters are created nor on how they will be sharded. Streams are always drawn on the CPU so the
same key gives the same bits whatever device the tensor ends up on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

__all__ = ["Key", "key", "fold_in", "split", "generator", "normal", "uniform", "randint", "seed_of"]


@dataclass(frozen=True)
class Key:
    """A random key: immutable, hashable, cheap to fold. Build one with :func:`key`."""

    seed: int
    path: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"Key.seed must be an int, got {type(self.seed).__name__}")


def key(seed: int) -> Key:
    """The root key for ``seed``."""
    return Key(int(seed))


def fold_in(parent: Key, *names: str | int) -> Key:
    """A child key, independent of its parent and siblings: ``fold_in(k, "layers", 3)``.

    A dotted name folds in each of its parts, so ``fold_in(k, "a.b") == fold_in(k, "a", "b")``.
    """
    parts = tuple(part for name in names for part in str(name).split("."))
    return Key(parent.seed, parent.path + parts)


def split(parent: Key, count: int) -> list[Key]:
    """``count`` independent children of ``parent``."""
    return [fold_in(parent, f"#{index}") for index in range(count)]


def seed_of(k: Key) -> int:
    """The 63-bit generator seed of a key (a hash of seed and path)."""
    message = repr((k.seed, k.path)).encode()
    return int.from_bytes(hashlib.blake2b(message, digest_size=8).digest(), "little") >> 1


def generator(k: Key) -> torch.Generator:
    """A CPU generator seeded by the key."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed_of(k))
    return gen


def normal(
    k: Key, shape: tuple[int, ...], std: float = 1.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal draws times ``std`` (drawn in float32, then cast)."""
    values = torch.randn(shape, generator=generator(k), dtype=torch.float32)
    return (values * std).to(dtype)


def uniform(
    k: Key, shape: tuple[int, ...], low: float = 0.0, high: float = 1.0, dtype=torch.float32
) -> torch.Tensor:
    values = torch.rand(shape, generator=generator(k), dtype=torch.float32)
    return (low + (high - low) * values).to(dtype)


def randint(k: Key, shape: tuple[int, ...], low: int, high: int) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=generator(k))
