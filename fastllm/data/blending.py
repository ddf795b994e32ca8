"""Blending several datasets by weight, with random access by global sample index.

Samples come in blocks of B. Dataset d's share of the first k blocks is the number of integers in
the interval (W_{d-1} k B + u, W_d k B + u], where W_d = w_1 + ... + w_d are the cumulative
normalised weights and u ~ U[0, 1) is drawn from the seed (systematic sampling):

    T_d(k) = floor(W_d k B + u) - floor(W_{d-1} k B + u)

The shares telescope to exactly k B, each T_d(k) is within one sample of w_d k B, and over u its
mean is exactly w_d k B. Block k holds T_d(k + 1) - T_d(k) samples of dataset d (never negative once
w_d B >= 2, which B is chosen to satisfy) in a seeded shuffled order, and the i-th sample of
dataset d in the whole run has within-dataset index T_d(k) + (its rank inside the block). Every
quantity is closed-form in k: no history, no precomputed index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fastllm import random
from fastllm.data.packing import numpy_generator
from fastllm.errors import UserError

__all__ = ["Blend"]


class Blend:
    """Maps global sample indices to (dataset, index within that dataset)."""

    def __init__(self, weights: Sequence[float | int] | np.ndarray, key: random.Key, block_size: int = 4096):
        weights = np.asarray(weights, dtype=np.float64)
        if len(weights) == 0 or np.any(~np.isfinite(weights)) or np.any(weights <= 0):
            raise UserError(f"blend weights must be positive and finite, got {weights.tolist()}")
        self.weights = weights / weights.sum()
        self.block_size = max(block_size, math.ceil(2.0 / self.weights.min()))
        cumulative = np.concatenate([[0.0], np.cumsum(self.weights)])
        cumulative[-1] = 1.0  # exactly, so the shares add up to k B
        self._cumulative = cumulative
        self.key = key
        self._offset = float(numpy_generator(random.fold_in(key, "blend", "offset")).random())
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def counts_before(self, block: int) -> np.ndarray:
        """T_d(block): samples of each dataset in blocks 0 .. block - 1 (int64 [n_datasets])."""
        edges = np.floor(self._cumulative * float(block * self.block_size) + self._offset).astype(np.int64)
        return np.diff(edges)

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset of each slot, within-dataset index of each slot) for one block, cached."""
        if block not in self._cache:
            before, after = self.counts_before(block), self.counts_before(block + 1)
            sizes = after - before
            if np.any(sizes < 0):  # cannot happen for w_d B >= 2; guard against rounding surprises
                raise AssertionError(f"negative block share {sizes.tolist()} in block {block}")
            slots = np.repeat(np.arange(len(sizes)), sizes)
            slots = slots[numpy_generator(random.fold_in(self.key, "blend", "block", block)).permutation(len(slots))]
            order = np.argsort(slots, kind="stable")
            rank = np.empty(len(slots), dtype=np.int64)
            rank[order] = np.arange(len(slots)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
            if len(self._cache) >= 4:
                self._cache.pop(min(self._cache))
            self._cache[block] = (slots, before[slots] + rank)
        return self._cache[block]

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices (int, >= 0) -> (dataset ids, within-dataset indices)."""
        indices = np.asarray(indices, dtype=np.int64)
        datasets = np.empty(len(indices), dtype=np.int64)
        within = np.empty(len(indices), dtype=np.int64)
        blocks, slots = np.divmod(indices, self.block_size)
        for block in np.unique(blocks):
            chosen = blocks == block
            block_datasets, block_within = self._block(int(block))
            datasets[chosen] = block_datasets[slots[chosen]]
            within[chosen] = block_within[slots[chosen]]
        return datasets, within
