"""Inspect checkpoints: list a folder, verify files, show what a file holds, convert a Lightning .ckpt.

Wired into ``python -m detector checkpoints ...``; ``main`` also runs on its own.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from detector.checkpoint import objects
from detector.checkpoint.format import (
    CheckpointFormatError,
    TensorInfo,
    file_kind,
    read_header,
    save_state,
    verify_state,
)
from detector.checkpoint.reader import disk_usage, read_checkpoint_header, verify_checkpoint
from detector.checkpoint.sharded import fill_sharded, is_sharded_checkpoint, read_index, state_file
from detector.checkpoint.tree import DTYPES_BY_CODE

_SCALARS = (int, float, bool, str, type(None))


def list_checkpoints(folder: str | Path) -> list[dict[str, Any]]:
    """One row per ``*.safetensors`` checkpoint in ``folder`` (a file, or a sharded folder shown with a
    trailing ``/``), read from headers only (no data verified).

    Returns:
        Rows with ``file``, ``bytes``, ``epoch``, ``global_step``, ``metrics`` (name -> value: a
        ``metrics`` entry's numbers and the callbacks' ``*score*`` entries) and ``error`` (None, or
        why the header could not be read).
    """
    rows = []
    for name, path in _checkpoint_files(folder):
        sharded = path.is_dir()
        size = disk_usage(path) if sharded else path.stat().st_size
        row: dict[str, Any] = {"file": name + "/" * sharded, "bytes": size, "error": None}
        try:
            header = read_checkpoint_header(path)
        except (CheckpointFormatError, OSError) as err:
            rows.append({**row, "epoch": None, "global_step": None, "metrics": {}, "error": str(err)})
            continue
        state = header["state"] if isinstance(header["state"], Mapping) else {}
        row.update(epoch=state.get("epoch"), global_step=state.get("global_step"))
        row["metrics"] = _read_scalars(state_file(path), header, _metric_entries(state))
        rows.append(row)
    return rows


def _checkpoint_files(folder: str | Path) -> list[tuple[str, Path]]:
    """``(name, local path)`` of each checkpoint in ``folder``; on an object store, the names of its
    manifest, each read from a verified-on-load local copy (:mod:`detector.checkpoint.objects`)."""
    if not objects.is_url(folder):
        return [(path.name, path) for path in sorted(Path(folder).glob("*.safetensors"))]
    names = sorted(objects.read_manifest(str(folder)))
    return [(name, objects.local_copy(objects.join(str(folder), name))) for name in names]


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of :func:`list_checkpoints` as an aligned text table."""
    names = sorted({name for row in rows for name in row["metrics"]})
    table = [["file", "epoch", "step", "size", *names]]
    for row in rows:
        values = [_cell(row["metrics"].get(name)) for name in names]
        position = [_cell(row["epoch"]), _cell(row["global_step"])]
        table.append([row["file"], *position, _size(row["bytes"]), *values])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in table)
    errors = [f"unreadable: {row['error']}" for row in rows if row["error"]]
    return "\n".join([*(line.rstrip() for line in lines), *errors])


def verify_checkpoints(paths: Sequence[str | Path]) -> list[tuple[str | Path, str | None]]:
    """Verify checkpoints (files, sharded folders, object URLs): ``(path, None)`` if intact, else
    ``(path, problem)``."""
    results: list[tuple[str | Path, str | None]] = []
    for path in (p if objects.is_url(p) else Path(p) for p in paths):
        try:
            verify_checkpoint(path)
            results.append((path, None))
        except (CheckpointFormatError, OSError) as err:
            results.append((path, str(err)))
    return results


def describe_checkpoint(path: str | Path, max_items: int = 50) -> str:
    """A readable tree of what ``path`` holds: keys, tensor dtypes/shapes/sizes, scalar values."""
    header = read_checkpoint_header(path)
    lines = [f"{path}: format v{header['format_version']}, {_size(header['file_bytes'])}"]
    infos = list(header["tensors"].values())
    state = header["state"]
    folder = objects.local_copy(str(path)) if objects.is_url(path) else path  # downloaded by the header read
    if is_sharded_checkpoint(folder):
        index = read_index(folder)
        sharded = {key: _sharded_info(key, entry) for key, entry in index["tensors"].items()}
        ranks, files = index["world_size"], len(index["shards"])
        size = _size(header["file_bytes"])
        lines[0] = f"{path}: sharded over {ranks} ranks ({files} shard files), state file {size}"
        state, infos = fill_sharded(state, sharded), infos + list(sharded.values())
    lines += _describe(state, "", max_items)
    total = sum(info.nbytes for info in infos)
    lines.append(f"{len(infos)} tensors, {_size(total)}; checksum {header['checksum']} (not verified here)")
    return "\n".join(lines)


def _sharded_info(key: str, entry: Mapping[str, Any]) -> TensorInfo:
    dtype = DTYPES_BY_CODE[entry["dtype"]]
    nbytes = math.prod(entry["shape"]) * dtype.itemsize
    return TensorInfo(key, dtype, tuple(entry["shape"]), 0, nbytes)


def convert_checkpoint(source: str | Path, target: str | Path) -> None:
    """Convert a Lightning/torch ``.ckpt`` into this format: the one place a pickle is read.

    Uses ``torch.load(..., weights_only=True)``, which refuses arbitrary objects; still, convert only
    files you trust. Anything but a regular file in torch's pickle formats (a safetensors file, a
    folder, a FIFO) is refused before it is read, and so is a pickle that holds no Lightning
    checkpoint (a dict with a ``state_dict``).

    Raises:
        ValueError: naming ``source`` and why it is not a convertible ``.ckpt``.
    """
    source = Path(source)
    _check_pickle_file(source)
    try:
        # An open file, not the path: torch.load hands a path named *.safetensors to safetensors.
        with source.open("rb") as handle:
            checkpoint = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
        reason = next(
            (line for line in lines if "Unpickler error" in line), lines[0] if lines else ""
        ).strip()
        raise ValueError(f"{source}: torch.load(weights_only=True) refused it: {reason}") from err
    except (RuntimeError, EOFError, OSError) as err:  # torch's zip reader on a torn or foreign file
        raise ValueError(
            f"{source}: not a readable torch/Lightning .ckpt ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        what = (
            f"keys {sorted(map(str, checkpoint))[:8]}"
            if isinstance(checkpoint, Mapping)
            else type(checkpoint)
        )
        raise ValueError(
            f"{source}: a pickle but not a Lightning checkpoint (no 'state_dict' mapping; {what})"
        )
    save_state(checkpoint, target)


def _check_pickle_file(source: Path) -> None:
    """Refuse, before reading, what cannot be a ``.ckpt``: non-regular files and non-pickle formats."""
    try:
        mode = source.stat().st_mode
    except OSError as err:
        raise ValueError(f"{source}: cannot be read ({err.strerror})") from err
    if not stat.S_ISREG(mode):
        raise ValueError(f"{source}: not a regular file but {file_kind(mode)}; convert takes a .ckpt file")
    with source.open("rb") as handle:
        magic = handle.read(4)
    if magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80":  # torch.save's zip, or a raw pickle
        return
    try:
        read_header(source)
    except CheckpointFormatError:
        raise ValueError(
            f"{source}: not a Lightning .ckpt (neither torch.save's zip nor a pickle: starts with {magic!r})"
        ) from None
    raise ValueError(f"{source}: already a detector safetensors checkpoint; nothing to convert")


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status (1 when a file fails or cannot be read)."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (CheckpointFormatError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detector checkpoints", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    listing = commands.add_parser("list", help="list a folder's checkpoints with epoch, step and metrics")
    listing.add_argument("folder", help="a checkpoint folder (outputs/checkpoints) or its URL (s3://...)")
    listing.set_defaults(run=lambda a: _run_list(a.folder))
    verify = commands.add_parser("verify", help="check files' integrity (exit status 1 on any failure)")
    verify.add_argument("paths", nargs="+", help="checkpoint files, sharded folders or object URLs")
    verify.set_defaults(run=lambda a: _run_verify(a.paths))
    show = commands.add_parser("show", help="show what a checkpoint holds")
    show.add_argument("path", help="a checkpoint file, sharded folder or object URL")
    show.add_argument("--max-items", type=int, default=50, help="entries shown per container")
    show.set_defaults(run=lambda a: _print(describe_checkpoint(a.path, a.max_items)))
    convert = commands.add_parser("convert", help="convert a trusted Lightning .ckpt (reads a pickle)")
    convert.add_argument("source", type=Path, help="the Lightning .ckpt to read (trusted: it is unpickled)")
    convert.add_argument("target", type=Path, help="the .safetensors checkpoint to write")
    convert.set_defaults(run=lambda a: _run_convert(a.source, a.target))
    return parser


def _print(text: str) -> int:
    print(text)
    return 0


def _run_convert(source: Path, target: Path) -> int:
    convert_checkpoint(source, target)
    verify_state(target)
    print(f"wrote {target} (verified)")
    return 0


def _run_list(folder: str) -> int:
    if not objects.is_url(folder) and not Path(folder).is_dir():
        raise ValueError(f"{folder} is not a folder")
    rows = list_checkpoints(folder)
    print(format_table(rows) if rows else f"no *.safetensors checkpoints in {folder}")
    return 0


def _run_verify(paths: Sequence[str]) -> int:
    failed = 0
    for path, problem in verify_checkpoints(paths):
        print(f"FAILED {problem}" if problem else f"OK     {path}")
        failed += problem is not None
    return 1 if failed else 0


def _metric_entries(state: Mapping[Any, Any]) -> dict[str, Any]:
    """Named metric values: a top-level ``metrics`` mapping and the callbacks' ``*score*`` entries."""
    found: dict[str, Any] = {}
    metrics = state.get("metrics")
    if isinstance(metrics, Mapping):
        found.update((str(name), value) for name, value in metrics.items())
    callbacks = state.get("callbacks")
    for callback, callback_state in callbacks.items() if isinstance(callbacks, Mapping) else ():
        if not isinstance(callback_state, Mapping):
            continue
        label = callback_state.get("monitor") or str(callback).split("{")[0]
        for key, value in callback_state.items():
            is_number = isinstance(value, float | int | TensorInfo) and not isinstance(value, bool)
            if "score" in str(key) and is_number:
                found[f"{key}({label})"] = value
    found.update(_validation_metrics(state))
    return found


def _validation_metrics(state: Mapping[Any, Any]) -> dict[str, Any]:
    """The metrics of the validation run at the file's step, from a checkpoint tracker's history.

    Lightning's ``*_step``/``*_epoch`` duplicates of a metric logged both ways are left out.
    """
    callbacks = state.get("callbacks")
    for callback_state in callbacks.values() if isinstance(callbacks, Mapping) else ():
        tracker = callback_state.get("tracker") if isinstance(callback_state, Mapping) else None
        history = tracker.get("history") if isinstance(tracker, Mapping) else None
        for entry in reversed(history) if isinstance(history, list) else ():
            metrics = entry.get("metrics") if isinstance(entry, Mapping) else None
            if entry.get("step") == state.get("global_step") and isinstance(metrics, Mapping):
                return {k: v for k, v in metrics.items() if not str(k).endswith(("_step", "_epoch"))}
    return {}


def _read_scalars(path: Path, header: Mapping[str, Any], entries: dict[str, Any]) -> dict[str, float]:
    """Numbers for the entries; one-element tensors are read from the file directly (unverified)."""
    values = {}
    with open(path, "rb") as f:
        for name, value in entries.items():
            if isinstance(value, TensorInfo):
                if value.nbytes > 16 or value.nbytes == 0:
                    continue
                f.seek(header["data_offset"] + value.start)
                value = torch.frombuffer(bytearray(f.read(value.nbytes)), dtype=value.dtype).item()
            if isinstance(value, float | int) and not isinstance(value, bool):
                values[name] = float(value)
    return values


def _describe(value: Any, indent: str, max_items: int) -> list[str]:
    if isinstance(value, Mapping):
        entries = list(value.items())
    elif isinstance(value, list | tuple) and not all(isinstance(item, _SCALARS) for item in value):
        entries = list(enumerate(value))
    else:
        return []
    lines = []
    for key, item in entries[:max_items]:
        lines.append(f"{indent}{key!r}: {_summary(item)}")
        lines += _describe(item, indent + "  ", max_items)
    if len(entries) > max_items:
        lines.append(f"{indent}... {len(entries) - max_items} more")
    return lines


def _summary(value: Any) -> str:
    if isinstance(value, TensorInfo):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{value.kind} {dtype} {list(value.shape)} ({_size(value.nbytes)})"
    if isinstance(value, Mapping):
        return f"{type(value).__name__} ({len(value)} entries)"
    if isinstance(value, list | tuple):
        if all(isinstance(item, _SCALARS) for item in value):
            shown = ", ".join(repr(item) for item in value[:8])
            return f"{type(value).__name__} [{shown}{', ...' if len(value) > 8 else ''}] ({len(value)} items)"
        return f"{type(value).__name__} ({len(value)} items)"
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _size(nbytes: float) -> str:
    units = ["B", "KiB", "MiB", "GiB"]
    while nbytes >= 1024 and len(units) > 1:
        nbytes /= 1024
        units.pop(0)
    return f"{nbytes:.0f} B" if units[0] == "B" else f"{nbytes:.1f} {units[0]}"


if __name__ == "__main__":
    raise SystemExit(main())
