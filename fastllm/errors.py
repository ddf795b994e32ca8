"""Errors that bad input causes, told apart from bugs.

A :class:`UserError` means "what you gave me is wrong": a file, a config key, a value, a flag. Its
message names that thing and says what was expected. The ``fastllm`` command prints such an error
(and an ``OSError``, which names a path or the disk) as one line and exits with status 2; any other
exception is a bug in fastllm and keeps its traceback.

Library exceptions that bad input provokes (a ``UnicodeDecodeError`` that names no file, the
``tokenizers`` parser's bare ``Exception``, safetensors' header errors) are converted into a
``UserError`` where fastllm calls the library, because only there is the file known.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["UserError", "Stop", "EXPECTED", "one_line", "read_json", "reading"]


class UserError(ValueError):
    """Bad input; the message names the file, key or value and what was expected.

    A ``ValueError``, so code that caught the ``ValueError`` it replaces keeps working."""


class Stop(Exception):
    """A command that ends before its work is done, on purpose or because of another process (a
    training run stopped by a signal with its checkpoint saved, a peer rank that died): the
    command prints the message as one line and exits with ``code``. ``speaker`` False: another
    process says it (one rank speaks for a distributed run)."""

    def __init__(self, message: str, code: int, *, speaker: bool = True):
        super().__init__(message)
        self.code, self.speaker = code, speaker


# What the command line reports as one line; everything else is a bug and shows its traceback.
EXPECTED = (UserError, OSError)


def one_line(error: BaseException) -> str:
    """The error as one line of text: an OSError as ``path: reason``, newlines folded."""
    if isinstance(error, OSError) and not isinstance(error, UserError) and error.strerror:
        text = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    else:
        text = str(error) or type(error).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def read_json(path: str | os.PathLike, what: str = "JSON object") -> Any:
    """The JSON object in the file ``path``, or a UserError naming the file (a missing file stays an
    OSError). ``what`` says what the file should hold, for the message."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not a {what} (invalid JSON: {error})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not a {what} (expected a JSON object, got {type(value).__name__})")
    return value


@contextmanager
def reading(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn what a reader raises about the *content* of ``path`` into a UserError naming it.

    For calls into code that reports a bad file as a plain ``ValueError`` (a JSON or UTF-8 error, a
    shape that does not match its config) or as safetensors' own error type. Wrap only the reading
    call: inside this block a ``ValueError`` is taken to mean "the file is wrong"."""
    from safetensors import SafetensorError

    try:
        yield
    except UserError:
        raise
    except (ValueError, SafetensorError) as error:
        detail = one_line(error).removeprefix(f"{path}: ")  # the path is said once
        raise UserError(f"{path}: cannot read {what}: {detail}") from None
