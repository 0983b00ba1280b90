"""Reading raw records from files and ``datasets``, each with its location (file and line).

JSON Lines (``.jsonl``, ``.ndjson``), JSON arrays, Parquet, ``datasets`` directories and
hub names. A file whose name does not say its format is read by its content. A line
that is not UTF-8, not JSON or not an object becomes a :class:`RecordError` naming the
file and line, which ``records.load_examples`` raises or, with ``strict=False``, skips and
counts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class Location:
    """Where a record came from: ``file`` and ``line`` (1-based int for JSON Lines, or
    ``"record N"`` with a 0-based index for JSON arrays, Parquet and ``datasets`` rows)."""

    file: str
    line: int | str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class RecordError(ValueError):
    """A record that cannot be used; the message is always ``"{file}:{line}: {problem}"``."""

    def __init__(self, location: Location, problem: str):
        self.location, self.problem = location, problem
        super().__init__(f"{location.file}:{location.line}: {problem}")


def _decode_lines(data: bytes, file: str) -> Iterator[tuple[Location, str | RecordError]]:
    """Lines of ``data`` as text, or a :class:`RecordError` for a line that is not UTF-8."""
    for number, raw in enumerate(data.splitlines(), start=1):
        loc = Location(file, number)
        try:
            yield loc, raw.decode("utf-8")
        except UnicodeDecodeError as err:
            bad = raw[err.start : err.start + 1].hex()
            yield loc, RecordError(loc, f"line is not valid UTF-8 (byte 0x{bad} at column {err.start + 1})")


def _jsonl_records(data: bytes, file: str) -> Iterator[tuple[Location, dict | RecordError]]:
    for loc, line in _decode_lines(data, file):
        if isinstance(line, RecordError):
            yield loc, line
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            yield loc, RecordError(loc, f"line is not valid JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(value, dict):
            yield loc, RecordError(loc, f"expected a JSON object, got {type(value).__name__}")
        else:
            yield loc, value


def _json_records(path: Path, file: str) -> Iterator[tuple[Location, dict | RecordError]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:  # JSON Lines with a bad line (skippable), or a broken document
        yield from _jsonl_records(data, file)
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None  # not one JSON document: read it as JSON Lines
    if isinstance(value, list):
        for index, item in enumerate(value):
            loc = Location(file, f"record {index}")
            ok = isinstance(item, dict)
            yield loc, item if ok else RecordError(loc, f"expected a JSON object, got {type(item).__name__}")
    elif value is None or (isinstance(value, dict) and len(text.strip().splitlines()) == 1):
        yield from _jsonl_records(data, file)
    else:
        loc = Location(file, 1)
        yield loc, RecordError(loc, f"expected a JSON array of objects or JSON Lines, got one {type(value).__name__}")


def _parquet_records(path: Path, file: str) -> Iterator[tuple[Location, dict]]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield Location(file, f"record {index}"), row
            index += 1


def _datasets_records(source: str, split: str, local: bool) -> Iterator[tuple[Location, dict]]:
    import datasets

    if local and any((Path(source) / f).exists() for f in ("dataset_dict.json", "state.json")):
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{source}: no split {split!r} (splits: {sorted(ds)})")
            ds = ds[split]
    else:  # a hub name, or a folder of data files that `load_dataset` understands
        ds = datasets.load_dataset(source, split=split)
    for index, row in enumerate(ds):
        yield Location(source, f"record {index}"), row


def _sniff_format(path: Path) -> str:
    """The data format of a file whose name does not say it, from its first bytes."""
    with path.open("rb") as f:
        head = f.read(4096)
    if head.startswith(b"PAR1"):
        return ".parquet"
    start = head.lstrip()[:1]
    if start == b"{":
        return ".jsonl"
    if start == b"[":
        return ".json"
    raise ValueError(
        f"{path}: cannot tell the data format from the file's content (expected JSON Lines, a JSON array or "
        f"Parquet; it starts with {head[:40]!r}); save it as .jsonl, .json or .parquet"
    )


def iter_records(source: str | os.PathLike, split: str) -> Iterator[tuple[Location, dict | RecordError]]:
    """Yield ``(location, record)`` pairs, or ``(location, RecordError)`` for unreadable ones."""
    file = os.fspath(source)
    path = Path(file)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES + (".json", ".parquet") and not path.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    if path.is_file() and suffix not in JSONL_SUFFIXES + (".json", ".parquet"):
        suffix = _sniff_format(path)  # e.g. JSON Lines saved as .txt: read by content
    if suffix in JSONL_SUFFIXES:
        yield from _jsonl_records(path.read_bytes(), file)
    elif suffix == ".json":
        yield from _json_records(path, file)
    elif suffix == ".parquet":
        yield from _parquet_records(path, file)
    else:
        yield from _datasets_records(file, split, local=path.is_dir())


def read_records(source: str | os.PathLike, split: str = "train") -> Iterator[tuple[Location, dict]]:
    """Read raw records from a file, a saved ``datasets`` directory or a ``datasets`` name.

    Args:
        source: a ``.jsonl`` / ``.ndjson`` file (one object per line; blank lines skipped),
            a ``.json`` file (an array of objects, or JSON Lines), a ``.parquet`` file, a
            directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``,
            or anything else ``datasets.load_dataset`` accepts (a hub name, a data folder).
        split: the split to read from a ``DatasetDict`` or a hub data set.

    Yields:
        ``(location, record)`` with ``record`` a dict.

    Raises:
        RecordError: at the first line that is not valid JSON or not a JSON object.
        FileNotFoundError: when a path with a data-file suffix does not exist.
    """
    for loc, record in iter_records(source, split):
        if isinstance(record, RecordError):
            raise record
        yield loc, record
