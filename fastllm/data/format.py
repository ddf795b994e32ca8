"""The on-disk token shard: one file per shard, read back zero-copy through a memory map.

Layout (little-endian)::

    header   64 bytes   magic b"FLLMTOK\\0", version u32, token itemsize u32 (2: uint16, 4: uint32),
                        flags u64 (bit 0: a loss mask follows), n_tokens u64, n_docs u64, zero padding
    tokens   n_tokens * itemsize
    padding  to a multiple of 8 bytes
    offsets  (n_docs + 1) * u64   document d is tokens[offsets[d]:offsets[d + 1]]
    mask     n_tokens * u8        only with flag bit 0: 1 where the token counts in the loss

A shard is written under ``NAME.partial`` with a zeroed header, fsync'ed, given its header last and
only then renamed to ``NAME``: an interrupted writer never leaves a file that opens as complete.
The SHA-256 of everything after the header is returned by the writer for the manifest.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from fastllm.errors import UserError

__all__ = ["MAGIC", "VERSION", "HEADER_BYTES", "ShardError", "Shard", "ShardWriter", "open_shard",
           "token_dtype", "payload_sha256"]

MAGIC = b"FLLMTOK\x00"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQQQ")
_FLAG_LOSS_MASK = 1
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


class ShardError(UserError):
    """A shard file that is truncated, corrupt, or not a fastllm token shard."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return _DTYPES[2] if vocab_size <= 1 << 16 else _DTYPES[4]


def _pad8(n: int) -> int:
    return -n % 8


@dataclass(frozen=True)
class Shard:
    """Views into one memory-mapped shard; nothing is copied."""

    path: str
    tokens: np.ndarray  # [n_tokens] uint16 | uint32
    offsets: np.ndarray  # [n_docs + 1] uint64
    loss_mask: Optional[np.ndarray]  # [n_tokens] uint8, or None

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def open_shard(path: str | os.PathLike) -> Shard:
    """Map a shard and check its header, size and offsets; a bad file raises :class:`ShardError`."""
    path = str(path)
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated shard ({size} bytes, shorter than the {HEADER_BYTES}-byte header)")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    magic, version, itemsize, flags, n_tokens, n_docs = _HEADER.unpack(bytes(data[: _HEADER.size]))
    if magic != MAGIC:
        raise ShardError(f"{path}: not a fastllm token shard (bad magic {magic!r}); an unfinished or foreign file")
    if version != VERSION:
        raise ShardError(f"{path}: shard format version {version}, this fastllm reads version {VERSION}")
    if itemsize not in _DTYPES:
        raise ShardError(f"{path}: corrupt header, token itemsize {itemsize} (expected 2 or 4)")
    token_end = HEADER_BYTES + n_tokens * itemsize
    offsets_start = token_end + _pad8(token_end)
    offsets_end = offsets_start + 8 * (n_docs + 1)
    expected = offsets_end + (n_tokens if flags & _FLAG_LOSS_MASK else 0)
    if size != expected:
        raise ShardError(f"{path}: truncated or corrupt shard: header says {n_tokens} tokens and {n_docs} "
                         f"documents ({expected} bytes) but the file has {size} bytes")
    tokens = data[HEADER_BYTES:token_end].view(_DTYPES[itemsize])
    offsets = data[offsets_start:offsets_end].view("<u8")
    if offsets[0] != 0 or offsets[-1] != n_tokens or (n_docs and np.any(offsets[1:] <= offsets[:-1])):
        raise ShardError(f"{path}: corrupt document index (offsets must rise strictly from 0 to {n_tokens})")
    mask = data[offsets_end:] if flags & _FLAG_LOSS_MASK else None
    return Shard(path, tokens, offsets, mask)


def payload_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of everything after the header (what the manifest records per shard)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class ShardWriter:
    """Append documents, then :meth:`close` to publish the shard atomically under ``path``."""

    def __init__(self, path: str | os.PathLike, dtype: np.dtype, with_loss_mask: bool = False):
        self.path = str(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._partial = self.path + ".partial"
        self._file = open(self._partial, "wb")
        self._file.write(b"\x00" * HEADER_BYTES)  # zero magic until the shard is complete
        self._mask = tempfile.TemporaryFile(dir=os.path.dirname(self.path) or ".") if with_loss_mask else None
        self._digest = hashlib.sha256()
        self._offsets = [0]
        self.max_id = -1  # the largest token id written (the manifest records it per shard)

    @property
    def n_tokens(self) -> int:
        return self._offsets[-1]

    @property
    def n_docs(self) -> int:
        return len(self._offsets) - 1

    def add(self, tokens: np.ndarray, loss_mask: Optional[np.ndarray] = None) -> None:
        """One document (non-empty); ``loss_mask`` is required iff the writer was opened with one."""
        if len(tokens) == 0:
            raise ValueError(f"{self.path}: a document must hold at least one token")
        if (loss_mask is None) != (self._mask is None):
            raise ValueError(f"{self.path}: loss_mask given to a writer opened with_loss_mask={self._mask is not None}")
        self.max_id = max(self.max_id, int(np.max(tokens)))
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._file.write(data)
        self._digest.update(data)
        if self._mask is not None:
            self._mask.write(np.ascontiguousarray(loss_mask, dtype=np.uint8).tobytes())
        self._offsets.append(self._offsets[-1] + len(tokens))

    def close(self) -> str:
        """Finish the file, fsync, rename into place; returns the payload SHA-256."""
        pad = b"\x00" * _pad8(HEADER_BYTES + self.n_tokens * self.dtype.itemsize)
        offsets = np.asarray(self._offsets, dtype="<u8").tobytes()
        for part in (pad, offsets):
            self._file.write(part)
            self._digest.update(part)
        if self._mask is not None:
            self._mask.seek(0)
            while chunk := self._mask.read(1 << 22):
                self._file.write(chunk)
                self._digest.update(chunk)
            self._mask.close()
        flags = _FLAG_LOSS_MASK if self._mask is not None else 0
        header = _HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, flags, self.n_tokens, self.n_docs)
        self._file.flush()
        os.fsync(self._file.fileno())  # data reaches the disk before the header that vouches for it
        self._file.seek(0)
        self._file.write(header.ljust(HEADER_BYTES, b"\x00"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._partial, self.path)
        return self._digest.hexdigest()

    def abort(self) -> None:
        """Drop the unfinished file."""
        self._file.close()
        if self._mask is not None:
            self._mask.close()
        Path(self._partial).unlink(missing_ok=True)

