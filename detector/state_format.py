"""Save and load a whole training state as one checkpoint file: streamed, atomic, checksummed, no pickle.

Saving streams the state tensor by tensor into a temp file beside the target (no second copy of the
state in memory; the checksum field is reserved at a fixed width in the header and patched once the
data is written), then commits it atomically (:mod:`detector.atomic`). Loading reads each tensor once
into its own memory while hashing it and compares the checksum before anything is returned. The file
layout and the checksum are described in :mod:`detector.state_layout`.
"""

from __future__ import annotations

import contextlib
import io
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.atomic import commit_file, temp_path_for
from detector.state_layout import (
    CHECKSUM_FIELD,
    FORMAT_VERSION,
    PIECE_BYTES,
    Layout,
    PieceHasher,
    TensorInfo,
    byte_view,
    encode_header,
    fail,
    plan_tensors,
    read_into,
    read_layout,
)
from detector.state_tree import CheckpointFormatError, flatten_state, unflatten_state

__all__ = [
    "CheckpointFormatError",
    "TensorInfo",
    "flatten_state",
    "load_state",
    "read_header",
    "save_state",
    "snapshot_state",
    "unflatten_state",
    "verify_state",
]


def save_state(state: Any, path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: the previous file stays intact until the new one is durable.

    Raises:
        CheckpointFormatError: for a value that cannot be stored (the message names its key path).
    """
    path = Path(path)
    tensors, skeleton = flatten_state(state)
    infos = plan_tensors(tensors)
    header = encode_header(infos, skeleton)
    checksum_at = header.index(CHECKSUM_FIELD) + len(CHECKSUM_FIELD)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            with PieceHasher() as hasher:
                for info in infos:
                    data = byte_view(tensors[info.name])
                    for start in range(0, len(data), PIECE_BYTES):
                        piece = data[start : start + PIECE_BYTES]
                        hasher.feed(piece)
                        f.write(piece)
                digest = hasher.hexdigest(header)
            f.seek(checksum_at)
            f.write(digest.encode("ascii"))
        commit_file(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def load_state(path: str | Path, map_location: str | torch.device | None = "cpu") -> Any:
    """Read a state written by :func:`save_state`, after verifying its checksum. Runs no pickle.

    Raises:
        CheckpointFormatError: naming the file and what is wrong, for a truncated, corrupt, foreign or
            non-safetensors file (a pickled ``.ckpt`` included: it is refused, never unpickled).
        ValueError: for a ``map_location`` that is not a device.
    """
    device = _device(map_location)
    path = Path(path)
    with open(path, "rb", buffering=0) as f:
        layout = read_layout(f, path)
        tensors = _read_data(f, layout, path, keep=True)
    if device.type != "cpu":
        tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    return _unflatten(path, tensors, layout.skeleton)


def verify_state(path: str | Path) -> None:
    """Check that ``path`` is an intact checkpoint (layout and checksum) without keeping its data.

    Raises:
        CheckpointFormatError: naming the file and what is wrong.
    """
    path = Path(path)
    with open(path, "rb", buffering=0) as f:
        layout = read_layout(f, path)
        _read_data(f, layout, path, keep=False)
    _unflatten(path, {info.name: info for info in layout.tensors}, layout.skeleton)


def read_header(path: str | Path) -> dict[str, Any]:
    """The header of a checkpoint, without reading (or verifying) its tensor data.

    Returns:
        ``format_version``, ``checksum``, ``file_bytes``, ``data_offset`` (where the tensor data
        starts), ``tensors`` (name -> :class:`TensorInfo`) and ``state``: the state tree with a
        :class:`TensorInfo` in place of each tensor or array.
    """
    path = Path(path)
    with open(path, "rb", buffering=0) as f:
        layout = read_layout(f, path)
    infos = {info.name: info for info in layout.tensors}
    return {
        "format_version": FORMAT_VERSION,
        "checksum": layout.checksum,
        "file_bytes": layout.file_bytes,
        "data_offset": len(layout.header),
        "tensors": infos,
        "state": _unflatten(path, infos, layout.skeleton),
    }


def snapshot_state(state: Any) -> Any:
    """A copy of ``state`` with every tensor cloned to CPU memory, for writing in the background.

    Containers are rebuilt; a tensor met twice is cloned once, so aliasing is kept.
    """
    return _snapshot(state, {})


def _snapshot(value: Any, memo: dict[int, Any]) -> Any:
    if isinstance(value, torch.Tensor | np.ndarray):
        if id(value) not in memo:
            memo[id(value)] = (
                value.copy() if isinstance(value, np.ndarray) else value.detach().to("cpu", copy=True)
            )
        return memo[id(value)]
    if type(value) in (dict, OrderedDict):
        copy = type(value)((key, _snapshot(item, memo)) for key, item in value.items())
        if hasattr(value, "_metadata"):
            copy._metadata = _snapshot(value._metadata, memo)  # type: ignore[attr-defined]
        return copy
    if type(value) in (list, tuple):
        return type(value)(_snapshot(item, memo) for item in value)
    return value


def _read_data(f: io.FileIO, layout: Layout, path: Path, keep: bool) -> dict[str, torch.Tensor]:
    """Read every tensor (into its own memory if ``keep``), hashing as it goes; then check the checksum."""
    tensors = {}
    with PieceHasher() as hasher:
        for info in layout.tensors:
            tensor = torch.empty(info.shape, dtype=info.dtype) if keep else None
            buffer = byte_view(tensor) if tensor is not None else None
            for start in range(0, info.nbytes, PIECE_BYTES):
                size = min(PIECE_BYTES, info.nbytes - start)
                piece = buffer[start : start + size] if buffer is not None else memoryview(bytearray(size))
                if not read_into(f, piece):
                    raise fail(path, f"truncated while reading tensor {info.name!r}")
                hasher.feed(piece)
            if tensor is not None:
                tensors[info.name] = tensor
        digest = hasher.hexdigest(layout.header)
    if digest != layout.checksum:
        raise fail(
            path, f"checksum mismatch, the file is corrupt (stored {layout.checksum}, computed {digest})"
        )
    return tensors


def _unflatten(path: Path, tensors: dict[str, Any], skeleton: Any) -> Any:
    try:
        return unflatten_state(tensors, skeleton)
    except CheckpointFormatError as err:
        raise fail(path, str(err)) from err


def _device(map_location: str | torch.device | None) -> torch.device:
    if map_location is None:
        return torch.device("cpu")
    if isinstance(map_location, str | torch.device):
        return torch.device(map_location)
    raise ValueError(f"map_location must be a device or a device name, got {map_location!r}")
