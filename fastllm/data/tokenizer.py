"""Loading a ``tokenizers`` tokenizer from a ``tokenizer.json`` or a transformers tokenizer directory.

Everything is local: nothing is downloaded. A tokenizer is identified by the SHA-256 of its
canonical JSON serialisation, which the manifest records so a dataset can be checked against the
tokenizer (and vocabulary) a model is trained with.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["TokenizerInfo", "load_tokenizer"]

# Names end-of-sequence tokens go by in common tokenizers, tried in order when none is named.
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[EOS]", "<|eos|>", "[SEP]")


@dataclass(frozen=True)
class TokenizerInfo:
    """What ``prepare`` needs from a tokenizer; ``json`` rebuilds it in worker processes."""

    path: str
    json: str
    sha256: str
    vocab_size: int
    eos_id: int
    eos_token: str


def _eos_from_config(directory: Path) -> Optional[str]:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = directory / name
        if file.is_file():
            eos = json.loads(file.read_text()).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str):
                return eos
    return None


def _backend_from_transformers(directory: Path):
    try:
        from transformers import AutoTokenizer
    except ImportError as error:  # pragma: no cover - transformers is a core dependency
        raise ImportError(f"{directory} has no tokenizer.json; reading it needs `transformers`") from error
    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{directory}: tokenizer {type(tok).__name__} is not a fast tokenizer; "
                         "convert it to a tokenizer.json first")
    return backend


def _load_backend(path: Path):
    from tokenizers import Tokenizer

    if path.is_file():
        return Tokenizer.from_file(str(path)), None
    if path.is_dir():
        config_eos = _eos_from_config(path)
        if (path / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(path / "tokenizer.json")), config_eos
        return _backend_from_transformers(path), config_eos
    raise FileNotFoundError(f"tokenizer not found: {path} (expected a tokenizer.json or a tokenizer directory)")


def load_tokenizer(path: str | os.PathLike, eos_token: Optional[str] = None) -> tuple[object, TokenizerInfo]:
    """``(tokenizers.Tokenizer, TokenizerInfo)``; the EOS token is ``eos_token``, else the directory's
    configured one, else the first common EOS name present in the vocabulary."""
    tokenizer, config_eos = _load_backend(Path(path))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    candidates = [eos_token] if eos_token else ([config_eos] if config_eos else []) + list(_EOS_CANDIDATES)
    eos = next((name for name in candidates if name in vocab), None)
    if eos is None:
        wanted = repr(eos_token) if eos_token else f"any of {candidates}"
        raise ValueError(f"tokenizer {path}: no end-of-sequence token ({wanted} is not in its vocabulary); "
                         "name one with eos_token= / --eos-token")
    serialized = tokenizer.to_str()
    info = TokenizerInfo(
        path=os.path.abspath(path),
        json=serialized,
        sha256=hashlib.sha256(serialized.encode()).hexdigest(),
        vocab_size=max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1),
        eos_id=vocab[eos],
        eos_token=eos,
    )
    return tokenizer, info
