"""Read labelled text files (JSONL, CSV, Parquet) into validated columns; errors name file and line."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detector.scoring import LABEL2ID

OPTIONAL_COLUMNS = ("source", "generator", "group", "id")
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class DataError(ValueError):
    """A data file is unreadable or holds a row that breaks the format; the message says where."""


@dataclass
class Records:
    """A data file's columns: ``text``, ``label`` (``None`` where unlabelled) and the optional extras."""

    path: str
    text: list[str] = field(default_factory=list)
    label: list[int | None] = field(default_factory=list)
    extra: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.text)

    def subset(self, indices: list[int]) -> Records:
        """The rows at ``indices``, in that order."""
        return Records(
            path=self.path,
            text=[self.text[i] for i in indices],
            label=[self.label[i] for i in indices],
            extra={name: [column[i] for i in indices] for name, column in self.extra.items()},
        )


def parse_label(value: Any, where: str) -> int:
    """Map 0/1 (int, float or string) or ``human``/``machine`` to 0/1; anything else is a ``DataError``."""
    if isinstance(value, bool):
        raise DataError(f"{where}: label must be 0/1 or human/machine, got {value!r}")
    if isinstance(value, int | float) and value in (0, 1):
        return int(value)
    if isinstance(value, str):
        key = value.strip().lower()
        if key in LABEL2ID:
            return LABEL2ID[key]
        if key in ("0", "1"):
            return int(key)
    raise DataError(f"{where}: label must be 0/1 or human/machine, got {value!r}")


def _text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are a ``DataError`` naming the line they are on."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        bad = data[error.start : error.end].hex(" ")
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte {bad} at offset {error.start}); re-save the file as UTF-8"
        ) from None


def _rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind == "jsonl":
        with io.StringIO(_text(path), newline=None) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: invalid JSON ({error.msg})") from error
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                yield f"{path}:{number}", row
    elif kind == "csv":
        with io.StringIO(_text(path), newline="") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                if None in row:  # DictReader's restkey: fields beyond the header's columns
                    raise DataError(
                        f"{path}:{reader.line_num}: {len(row[None])} more field(s) than the header's "
                        f"{len(reader.fieldnames or [])} columns {reader.fieldnames}; "
                        "quote a text that holds commas"
                    )
                yield f"{path}:{reader.line_num}", row
    elif kind == "parquet":
        import pyarrow.parquet as pq

        for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path}: row {number}", row
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(SUFFIXES)}")


def read_records(path: str | Path, require_label: bool = True) -> Records:
    """Read and validate every row of ``path``; no row is dropped, a bad one raises ``DataError``.

    Args:
        path: a ``.jsonl``, ``.csv`` or ``.parquet`` file with a ``text`` column and a ``label`` column.
        require_label: when False (prediction files) the label may be missing; a present one is validated.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    records = Records(path=str(path))
    for where, row in _rows(path):
        _append_row(records, row, where, require_label)
    if not records.text:
        raise DataError(f"{path}: no rows")
    _drop_empty_extras(records)
    return records


def _append_row(records: Records, row: dict[str, Any], where: str, require_label: bool) -> None:
    for column in ("text", "label") if require_label else ("text",):
        if column not in row:
            raise DataError(f"{where}: missing column {column!r}; columns: {sorted(row)}")
    text = row["text"]
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: empty text")
    label = row.get("label")
    records.text.append(text)
    records.label.append(None if label is None and not require_label else parse_label(label, where))
    for column in OPTIONAL_COLUMNS:
        records.extra.setdefault(column, []).append(row.get(column))


def _drop_empty_extras(records: Records) -> None:
    # Optional columns absent from every row carry no information; keep the ones the file has.
    for column in OPTIONAL_COLUMNS:
        if all(value is None for value in records.extra[column]):
            del records.extra[column]
