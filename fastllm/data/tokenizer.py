"""Loading a ``tokenizers`` tokenizer from a ``tokenizer.json`` or a transformers tokenizer directory.

Everything is local: nothing is downloaded. A tokenizer is identified by the SHA-256 of its
canonical JSON serialisation, which the manifest records so a dataset can be checked against the
tokenizer (and vocabulary) a model is trained with.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fastllm.errors import UserError, one_line, read_json

__all__ = ["TokenizerInfo", "load_tokenizer", "read_tokenizer", "special_tokens", "vocab_size"]

# Names end-of-sequence tokens go by in common tokenizers, tried in order when none is named.
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[EOS]", "<|eos|>", "[SEP]")
# Likewise for beginning-of-sequence tokens (GPT-2 style tokenizers have none of their own).
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[BOS]", "<|bos|>")


@dataclass(frozen=True)
class TokenizerInfo:
    """What ``prepare`` needs from a tokenizer; ``json`` rebuilds it in worker processes."""

    path: str
    json: str
    sha256: str
    vocab_size: int
    eos_id: int
    eos_token: str


def _configured(directory: Path) -> dict[str, str]:
    """The bos/eos tokens a transformers tokenizer directory names in its config files."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        file = directory / name
        if file.is_file():
            config = read_json(file, "tokenizer config")
            for key in ("bos_token", "eos_token"):
                value = config.get(key)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    found[key] = value
    return found


def _from_file(file: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception as error:  # noqa: BLE001 - the tokenizers parser raises a bare Exception
        raise UserError(f"{file}: not a tokenizers tokenizer.json ({one_line(error)})") from None


def _backend_from_transformers(directory: Path):
    try:
        from transformers import AutoTokenizer
    except ImportError as error:  # pragma: no cover - transformers is a core dependency
        raise ImportError(f"{directory} has no tokenizer.json; reading it needs `transformers`") from error
    try:  # local files only, and never code shipped with the tokenizer
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - transformers raises many types for an unusable directory
        raise UserError(f"{directory}: no tokenizer.json and not a transformers tokenizer directory "
                        f"({one_line(error)})") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"{directory}: tokenizer {type(tok).__name__} is not a fast tokenizer; "
                        "convert it to a tokenizer.json first")
    return backend


def _load_backend(path: Path):
    """(tokenizers.Tokenizer, the special tokens its directory configures)."""
    if path.is_file():
        return _from_file(path), {}
    if path.is_dir():
        configured = _configured(path)
        if (path / "tokenizer.json").is_file():
            return _from_file(path / "tokenizer.json"), configured
        return _backend_from_transformers(path), configured
    raise FileNotFoundError(f"tokenizer not found: {path} (expected a tokenizer.json or a tokenizer directory)")


def read_tokenizer(path: str | os.PathLike):
    """The ``tokenizers.Tokenizer`` of a tokenizer.json or a tokenizer directory (UserError if neither)."""
    return _load_backend(Path(path))[0]


def vocab_size(tokenizer) -> int:
    """Ids the tokenizer can produce: its size, or one more than its largest id if that is larger."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)


def _pick(vocab: dict[str, int], candidates) -> Optional[str]:
    return next((name for name in candidates if name and name in vocab), None)


def special_tokens(tokenizer, eos_token: Optional[str] = None) -> dict[str, tuple[str, int]]:
    """``{"bos_token": (token, id), "eos_token": (token, id)}``, for those the tokenizer defines.

    ``tokenizer``: a ``tokenizers.Tokenizer``, a tokenizer.json or a tokenizer directory. Each token
    is the given ``eos_token``, else the one the directory's config names, else the first common
    name of it; only tokens in the vocabulary count."""
    configured = {}
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer, configured = _load_backend(Path(tokenizer))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    eos = _pick(vocab, [eos_token, configured.get("eos_token"), *_EOS_CANDIDATES])
    bos = _pick(vocab, [configured.get("bos_token"), *_BOS_CANDIDATES])
    return {key: (token, vocab[token]) for key, token in (("bos_token", bos), ("eos_token", eos)) if token}


def load_tokenizer(path: str | os.PathLike, eos_token: Optional[str] = None) -> tuple[object, TokenizerInfo]:
    """``(tokenizers.Tokenizer, TokenizerInfo)``; the EOS token is ``eos_token``, else the directory's
    configured one, else the first common EOS name present in the vocabulary."""
    tokenizer, configured = _load_backend(Path(path))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    configured_eos = [configured["eos_token"]] if "eos_token" in configured else []
    candidates = [eos_token] if eos_token else configured_eos + list(_EOS_CANDIDATES)
    eos = _pick(vocab, candidates)
    if eos is None:
        wanted = repr(eos_token) if eos_token else f"any of {candidates}"
        raise UserError(f"tokenizer {path}: no end-of-sequence token ({wanted} is not in its vocabulary); "
                        "name one with eos_token= / --eos-token")
    serialized = tokenizer.to_str()
    info = TokenizerInfo(
        path=os.path.abspath(path),
        json=serialized,
        sha256=hashlib.sha256(serialized.encode()).hexdigest(),
        vocab_size=vocab_size(tokenizer),
        eos_id=vocab[eos],
        eos_token=eos,
    )
    return tokenizer, info
