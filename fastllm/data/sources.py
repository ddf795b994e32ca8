"""Input readers for ``prepare``: JSON lines, Parquet, plain text, and Hugging Face ``datasets``
directories (the Arrow IPC files ``save_to_disk`` writes). Each yields records, a record being a
tuple of strings, one per requested field, in file order.

Parquet and Arrow need ``pyarrow``, imported only when such an input is read.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Literal

from fastllm.errors import UserError, one_line, read_json

__all__ = ["Source", "resolve_inputs", "read_records", "file_sha256"]

SourceKind = Literal["jsonl", "parquet", "text", "arrow"]
_SUFFIXES: dict[str, SourceKind] = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet",
    ".txt": "text", ".text": "text", ".md": "text",
}


@dataclass(frozen=True)
class Source:
    """One input: its path, kind, and the files that hold its data, in reading order."""

    path: str
    kind: SourceKind
    files: tuple[str, ...]


def _kind_of(path: Path) -> SourceKind | None:
    name = path.name.lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return _SUFFIXES[suffix]
    return None


def _arrow_dataset(directory: Path) -> Source:
    state = read_json(directory / "state.json", "datasets state file")
    entries = state.get("_data_files") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("filename"), str)
                                                for e in entries):
        raise UserError(f"{directory / 'state.json'}: '_data_files' must be a list of {{\"filename\": ...}}")
    names = [entry["filename"] for entry in entries]
    names = names or sorted(p.name for p in directory.glob("*.arrow"))
    files = tuple(str(directory / name) for name in names)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"datasets directory {directory}: state.json lists missing files {missing}")
    return Source(str(directory), "arrow", files)


def _resolve_directory(directory: Path) -> list[Source]:
    if (directory / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in directory.iterdir() if p.is_dir())
        raise UserError(f"{directory} is a datasets DatasetDict; pass one split directory, e.g. "
                         f"{directory / (splits[0] if splits else 'train')}")
    if (directory / "state.json").is_file():
        return [_arrow_dataset(directory)]
    found = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            file = Path(root) / name
            kind = _kind_of(file)
            if kind is not None:
                found.append(Source(str(file), kind, (str(file),)))
    return found


def resolve_inputs(inputs: Sequence[str | os.PathLike]) -> list[Source]:
    """Files and directories -> sources, in the given order (directories walked in sorted order)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    sources: list[Source] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            sources += _resolve_directory(path)
        elif path.is_file():
            kind = _kind_of(path)
            if kind is None:
                raise UserError(f"{path}: unsupported input type; expected one of {sorted(_SUFFIXES)}, "
                                 "or a directory")
            sources.append(Source(str(path), kind, (str(path),)))
        else:
            raise FileNotFoundError(f"input not found: {path}")
    if not sources:
        raise UserError(f"no input files found in {[str(i) for i in inputs]} "
                         f"(looked for {sorted(_SUFFIXES)} files and datasets directories)")
    return sources


def _field_values(record: dict, fields: Sequence[str], where: str) -> tuple[str, ...]:
    values = []
    for field in fields:
        if field not in record:
            raise UserError(f"{where}: no field {field!r} (fields present: {sorted(record)})")
        value = record[field]
        if not isinstance(value, str):
            raise UserError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
        values.append(value)
    return tuple(values)


def _decoded(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{where}: not UTF-8 text (byte {raw[error.start]:#04x} at offset {error.start}); "
                        "inputs must be UTF-8") from None


def _read_jsonl(file: str, fields: Sequence[str]) -> Iterator[tuple[str, ...]]:
    opener = gzip.open if file.endswith(".gz") else open
    with opener(file, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = _decoded(raw, f"{file}:{number}")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{file}:{number}: invalid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{file}:{number}: expected a JSON object per line")
            yield _field_values(record, fields, f"{file}:{number}")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError("reading Parquet or datasets directories needs the `pyarrow` package: "
                        "pip install pyarrow") from None
    return pyarrow


def _check_columns(fields: Sequence[str], names: Sequence[str], file: str) -> None:
    missing = [f for f in fields if f not in names]
    if missing:
        raise UserError(f"{file}: no column {missing[0]!r} (columns present: {list(names)})")


def _read_batches(batches, fields: Sequence[str], file: str) -> Iterator[tuple[str, ...]]:
    for batch in batches:
        columns = [batch.column(batch.schema.get_field_index(f)).to_pylist() for f in fields]
        for row, values in enumerate(zip(*columns)):
            yield _field_values(dict(zip(fields, values)), fields, f"{file} (row {row} of a batch)")


def _read_parquet(file: str, fields: Sequence[str]) -> Iterator[tuple[str, ...]]:
    parquet = _pyarrow().parquet.ParquetFile(file)
    _check_columns(fields, parquet.schema_arrow.names, file)
    yield from _read_batches(parquet.iter_batches(columns=list(fields)), fields, file)


def _read_arrow(file: str, fields: Sequence[str]) -> Iterator[tuple[str, ...]]:
    pa = _pyarrow()
    with pa.memory_map(file) as source:
        try:
            reader = pa.ipc.open_stream(source)  # the stream format datasets' save_to_disk writes
            batches = iter(reader)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        _check_columns(fields, reader.schema.names, file)
        yield from _read_batches(batches, fields, file)


def _read_text(file: str, fields: Sequence[str], text_mode: str) -> Iterator[tuple[str, ...]]:
    if len(fields) != 1:
        raise UserError(f"{file}: plain text files hold one text per document, not fields {list(fields)}")
    with open(file, "rb") as f:
        if text_mode == "file":
            yield (_decoded(f.read(), file),)
        else:
            yield from ((_decoded(raw, f"{file}:{number}").rstrip("\n"),) for number, raw in enumerate(f, 1))


def read_records(source: Source, fields: Sequence[str], text_mode: str = "file") -> Iterator[tuple[str, ...]]:
    """Records of ``fields`` from every file of ``source``; ``text_mode`` ("file" or "line") says
    whether a plain text file is one document or one document per line."""
    if text_mode not in ("file", "line"):
        raise UserError(f"text_mode must be 'file' or 'line', got {text_mode!r}")
    for file in source.files:
        with _container_errors(file, source.kind):
            if source.kind == "jsonl":
                yield from _read_jsonl(file, fields)
            elif source.kind == "parquet":
                yield from _read_parquet(file, fields)
            elif source.kind == "arrow":
                yield from _read_arrow(file, fields)
            else:
                yield from _read_text(file, fields, text_mode)


@contextlib.contextmanager
def _container_errors(file: str, kind: str) -> Iterator[None]:
    """A truncated or foreign gzip, Parquet or Arrow file is reported by its library without the
    file's name (an EOFError, a zlib or Arrow error); name it here."""
    arrow_error = _arrow_error_type() if kind in ("parquet", "arrow") else ()
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise UserError(f"{file}: truncated or corrupt gzip file ({error})") from None
    except arrow_error as error:
        raise UserError(f"{file}: not a readable {kind} file ({one_line(error)})") from None


def _arrow_error_type() -> tuple[type, ...]:
    return (_pyarrow().ArrowException,)


def file_sha256(file: str) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
