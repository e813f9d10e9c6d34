"""``detector score``: score a JSONL, CSV or text file (or standard input) with a bundle, write JSONL."""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from detector.atomic import open_for_write
from detector.bundle.loading import BACKENDS, WINDOW_BATCHES, Detector, load_detector
from detector.commands import add_no_verify

Record = tuple[Any, str]  # (id or None, text)
FORMATS = ("auto", "jsonl", "csv", "text")
SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".txt": "text"}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m detector score``."""
    parser = argparse.ArgumentParser(
        prog="detector score",
        description="Score texts with a bundle: one JSON line per text with id (when given), "
        "prob_machine, label and is_machine.",
    )
    parser.add_argument(
        "bundle", help="bundle folder (outputs/models/inference/model_vX.Y_...) or its URL (s3://...)"
    )
    parser.add_argument("input", help="a .jsonl, .csv or .txt file, or - for standard input")
    parser.add_argument("--output", "-o", default="-", help="JSONL file to write, or - for stdout (default)")
    parser.add_argument(
        "--format", choices=FORMATS, default="auto", help="input format (auto: by suffix; stdin: jsonl)"
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="PyTorch (model.safetensors), ONNX Runtime fp32 (model.onnx) or int8 (model_int8.onnx, "
        "from export --quantize, at its own threshold)",
    )
    parser.add_argument(
        "--threshold", type=float, default=None, help="override the bundle's decision threshold"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    parser.add_argument("--text-field", default="text", help="JSONL key or CSV column of the text")
    parser.add_argument(
        "--id-field", default="id", help="JSONL key or CSV column of the id, copied when present"
    )
    parser.add_argument("--device", default="cpu", help="PyTorch device (torch backend)")
    add_no_verify(parser)
    return parser


def input_format(source: str, fmt: str) -> str:
    """The concrete format of ``source`` for ``--format fmt``."""
    if fmt != "auto":
        return fmt
    if source == "-":
        return "jsonl"
    suffix = Path(source).suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        raise ValueError(
            f"cannot tell the format of {source!r} from its suffix; pass --format jsonl|csv|text"
        )
    return SUFFIX_FORMATS[suffix]


def _jsonl_records(lines: Iterable[str], text_field: str, id_field: str) -> Iterator[Record]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"line {number} is not JSON ({err.msg}); for plain text use --format text"
            ) from err
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(
                f"line {number} has no string field {text_field!r} (has {keys}); see --text-field"
            )
        yield row.get(id_field), row[text_field]


def _csv_records(lines: Iterable[str], text_field: str, id_field: str) -> Iterator[Record]:
    reader = csv.DictReader(lines)
    if reader.fieldnames is None or text_field not in reader.fieldnames:
        raise ValueError(
            f"the CSV has no column {text_field!r} (columns: {reader.fieldnames}); see --text-field"
        )
    for row in reader:
        yield row.get(id_field), row[text_field]


def read_inputs(
    stream: IO[str], fmt: str, text_field: str = "text", id_field: str = "id"
) -> Iterator[Record]:
    """``(id or None, text)`` per input record; text format: one text per line, ids absent."""
    if fmt == "jsonl":
        return _jsonl_records(stream, text_field, id_field)
    if fmt == "csv":
        return _csv_records(stream, text_field, id_field)
    if fmt == "text":
        return ((None, line.rstrip("\r\n")) for line in stream)
    raise ValueError(f"format must be one of {FORMATS[1:]}, got {fmt!r}")


def score_records(detector: Detector, records: Iterable[Record], out: IO[str], batch_size: int) -> int:
    """Score ``records`` chunk by chunk, write one JSON line each to ``out``; return the count."""
    count = 0
    iterator = iter(records)
    while chunk := list(itertools.islice(iterator, batch_size * WINDOW_BATCHES)):
        results = detector.score([text for _, text in chunk], batch_size=batch_size)
        for (record_id, _), result in zip(chunk, results, strict=True):
            row = {"id": record_id, **result} if record_id is not None else result
            out.write(json.dumps(row) + "\n")
        out.flush()
        count += len(chunk)
    return count


@contextlib.contextmanager
def _output(target: str) -> Iterator[IO[str]]:
    if target == "-":
        yield sys.stdout
        return
    with open_for_write(Path(target)) as out:
        yield out


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``detector score``; return 0 on success, 2 on bad input (the message goes to stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")
    try:
        fmt = input_format(args.input, args.format)
        detector = load_detector(
            args.bundle, args.backend, threshold=args.threshold, device=args.device, verify=not args.no_verify
        )
        with contextlib.ExitStack() as stack:
            stream = (
                sys.stdin
                if args.input == "-"
                else stack.enter_context(open(args.input, encoding="utf-8", newline=""))
            )
            out = stack.enter_context(_output(args.output))
            score_records(
                detector, read_inputs(stream, fmt, args.text_field, args.id_field), out, args.batch_size
            )
    except (ValueError, FileNotFoundError) as err:
        print(f"detector score: error: {err}", file=sys.stderr)
        return 2
    return 0
