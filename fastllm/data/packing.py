"""Packing documents into fixed-length rows, with random access by row index.

For each epoch the documents of one dataset split are put in a seeded order and concatenated into
one token stream; row ``r`` is ``stream[r * L : r * L + L + 1]`` (L = seq_len): inputs are its first
L tokens, targets its last L (next-token prediction, Radford et al. 2018). Rows overlap by one
token, so no target is lost, and no padding is needed. Row ``j`` of the whole run is row
``j mod R`` of epoch ``j div R`` (R rows per epoch): a pure function of (seed, j), so any rank can
read any row without reading what came before.

Document boundaries are kept: ``segment_ids`` numbers the documents inside a row from 0 and
``positions`` restarts at 0 where each one starts, so attention can be restricted to a document
(varlen attention) and, with ``mask_cross_document_loss``, the target that crosses from one
document's EOS into the next document is ignored. With ``document_attention=False`` a row is one
stream: no ``segment_ids`` or ``positions`` (plain causal attention, positions 0..L-1). Long
documents are split across rows, or with ``split_long_documents=False`` truncated to L tokens
before packing. A dataset prepared with a loss mask (SFT) ignores targets whose token is outside
the mask, i.e. prompt tokens.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from fastllm import random
from fastllm.data.dataset import TokenDataset
from fastllm.data.format import ShardError
from fastllm.errors import UserError

__all__ = ["IGNORE_INDEX", "PackedSequences", "numpy_generator"]

IGNORE_INDEX = -100  # the target value the cross-entropy skips (same as fastllm.nn.loss)


def numpy_generator(key: random.Key) -> np.random.Generator:
    """A numpy generator whose stream is a pure function of the key (seed and path)."""
    return np.random.Generator(np.random.PCG64(random.seed_of(key)))


class PackedSequences:
    """Rows of ``seq_len`` tokens packed from the documents ``doc_ids`` of ``dataset``."""

    def __init__(self, dataset: TokenDataset, doc_ids: np.ndarray, seq_len: int, key: random.Key, *,
                 split_long_documents: bool = True, mask_cross_document_loss: bool = False,
                 document_attention: bool = True):
        self.dataset = dataset
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.seq_len = seq_len
        self.key = key
        self.mask_cross_document_loss = mask_cross_document_loss
        self.document_attention = document_attention
        lengths = dataset.lengths[self.doc_ids]
        self.lengths = lengths if split_long_documents else np.minimum(lengths, seq_len)
        total = int(self.lengths.sum())
        self.rows_per_epoch = (total - 1) // seq_len if total else 0
        if self.rows_per_epoch < 1:
            raise UserError(f"{dataset.path}: this split holds {total} tokens in {len(self.doc_ids)} documents, "
                             f"fewer than one row of seq_len + 1 = {seq_len + 1} tokens")
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, stream end of each document in that order) for one epoch, cached."""
        if epoch not in self._epochs:
            order = numpy_generator(random.fold_in(self.key, "epoch", epoch)).permutation(len(self.doc_ids))
            if len(self._epochs) >= 2:  # rows are read in order: older epochs are done with
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (order, np.cumsum(self.lengths[order]))
        return self._epochs[epoch]

    def _pieces(self, index: int):
        """(token slices, loss-mask slices or None) of consecutive documents covering the row."""
        epoch, row = divmod(index, self.rows_per_epoch)
        order, ends = self._epoch(epoch)
        position, stop = row * self.seq_len, row * self.seq_len + self.seq_len + 1
        k = int(np.searchsorted(ends, position, side="right"))
        tokens, masks = [], []
        while position < stop:
            local = order[k]
            begin = int(ends[k]) - int(self.lengths[local])
            a, b = position - begin, min(int(self.lengths[local]), stop - begin)
            doc = int(self.doc_ids[local])
            tokens.append(self.dataset.document(doc)[a:b])
            mask = self.dataset.loss_mask(doc)
            masks.append(None if mask is None else mask[a:b])
            position, k = position + (b - a), k + 1
        return tokens, masks

    def row(self, index: int) -> dict[str, np.ndarray]:
        """Row ``index`` (any int >= 0; epochs follow one another): int64 arrays of length seq_len."""
        if index < 0:
            raise IndexError(f"row index must be >= 0, got {index}")
        tokens, masks = self._pieces(index)
        sizes = [len(t) for t in tokens]
        stream = np.concatenate(tokens).astype(np.int64)  # [L + 1]
        limit = self.dataset.id_limit
        if limit is not None and int(stream.max()) >= limit:  # a shard changed since it was opened and checked
            raise ShardError(f"{self.dataset.path}: row {index} holds token id {int(stream.max())}, but the "
                             f"model's vocab_size is {limit}; the data changed after prepare (corrupt shard?)")
        segments = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        targets = stream[1:].copy()
        if self.mask_cross_document_loss:
            targets[segments[1:] != segments[:-1]] = IGNORE_INDEX
        loss_mask: Optional[np.ndarray] = np.concatenate(masks) if masks[0] is not None else None
        if loss_mask is not None:
            targets[loss_mask[1:] == 0] = IGNORE_INDEX  # prompt tokens are never targets
        arrays = {"tokens": stream[:-1], "targets": targets}
        if self.document_attention:
            positions = np.arange(len(stream), dtype=np.int64) - np.repeat(np.cumsum([0] + sizes[:-1]), sizes)
            arrays.update(positions=positions[:-1], segment_ids=segments[:-1])
        return arrays
