"""The bytes of a checkpoint file: a standard safetensors file whose header also carries the state.

Every tensor of the state is a safetensors tensor (the biggest dtypes first, so each one is aligned);
the header's ``__metadata__`` holds ``format``, ``format_version``, ``checksum`` and ``skeleton`` (the
JSON tree of :mod:`detector.checkpoint.tree`). Any safetensors reader can open the file.

Checksum: ``KIND:HEX``, the SHA-256 of (the 8-byte length prefix + the header, with the checksum's
64 hex digits written as zeros) followed by one digest per data piece (each tensor's bytes, cut in
16 MiB pieces); ``KIND`` names the piece digest (``xxh3-tree`` by default, ``crc32-tree`` or
``sha256-tree``: see :mod:`detector.checkpoint.pieces`), so files of every kind stay readable. The
header is covered too, so a flipped byte anywhere in the file is caught. It guards against
corruption, not forgery: anyone who can write the file can recompute it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from detector.checkpoint.pieces import PIECE_DIGESTS
from detector.checkpoint.tree import DTYPE_CODES, DTYPES_BY_CODE, CheckpointFormatError

FORMAT_NAME = "detector.state"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100_000_000  # the same bound safetensors itself enforces
CHECKSUM_FIELD = b'"checksum":"'
_PLACEHOLDER = b"0" * 64
_PICKLE_REFUSED = (
    "a pickle file (torch.save / Lightning .ckpt), not a safetensors checkpoint; it was not loaded."
    " Convert a trusted .ckpt explicitly: `python -m detector checkpoints convert IN.ckpt OUT.safetensors`"
)


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the header describes it; ``start``/``end`` are byte offsets into the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int
    kind: str = "tensor"  # or "ndarray": what the state holds in its place

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Layout:
    """What the header of a checkpoint says, with the bytes its checksum covers."""

    header: bytes  # length prefix + header JSON, checksum digits zeroed
    checksum_kind: str
    checksum: str
    skeleton: Any
    tensors: list[TensorInfo]
    file_bytes: int
    extra: dict[str, str]  # the __metadata__ entries beyond the format's own (see encode_header)


def plan_tensors(tensors: dict[str, torch.Tensor]) -> list[TensorInfo]:
    infos, offset = [], 0
    for name in sorted(tensors, key=lambda name: -tensors[name].element_size()):
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        infos.append(TensorInfo(name, tensor.dtype, tuple(tensor.shape), offset, offset + nbytes))
        offset += nbytes
    return infos


def encode_header(
    infos: list[TensorInfo], skeleton: Any, checksum_kind: str, extra: Mapping[str, str] | None = None
) -> tuple[bytes, int]:
    """The length prefix + header JSON with zeroed checksum digits, and where those digits start.

    Raises:
        ValueError: if ``extra`` is not str -> str or would replace one of the format's own entries.
    """
    extra = dict(extra or {})
    if any(not isinstance(k, str) or not isinstance(v, str) for k, v in extra.items()):
        raise ValueError(f"extra metadata must map str to str, got {sorted(map(repr, extra))}")
    metadata = {
        **extra,
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "checksum": f"{checksum_kind}:{_PLACEHOLDER.decode()}",
        "skeleton": json.dumps(skeleton, allow_nan=False, separators=(",", ":")),
    }
    if len(metadata) != len(extra) + 4:
        raise ValueError(f"extra metadata may not replace the format's own entries: {sorted(extra)}")
    header: dict[str, Any] = {"__metadata__": metadata}
    for info in infos:
        offsets = [info.start, info.end]
        header[info.name] = {"dtype": DTYPE_CODES[info.dtype], "shape": info.shape, "data_offsets": offsets}
    raw = json.dumps(header, separators=(",", ":")).encode("ascii")
    raw += b" " * (-len(raw) % 8)  # safetensors allows trailing spaces; keeps the data 8-byte aligned
    encoded = struct.pack("<Q", len(raw)) + raw
    return encoded, encoded.index(CHECKSUM_FIELD) + len(CHECKSUM_FIELD) + len(checksum_kind) + 1


def fail(path: Path, problem: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path}: {problem}")


def read_layout(fd: int, path: Path) -> Layout:
    """Read and check the header of the open file ``fd``; reads no tensor data.

    Raises:
        CheckpointFormatError: for anything but an intact-looking checkpoint header of this format.
    """
    file_bytes = os.fstat(fd).st_size
    prefix = os.pread(fd, 8, 0)
    size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
    if size is None or size > MAX_HEADER_BYTES or size > file_bytes - 8:
        if prefix[:4] == b"PK\x03\x04" or prefix[:1] == b"\x80":  # zip (torch.save) or raw pickle
            raise fail(path, _PICKLE_REFUSED)
        raise fail(path, _bad_length(size, file_bytes))
    raw = os.pread(fd, size, 8)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise fail(path, f"header is not valid JSON ({err})") from err
    except RecursionError:
        raise fail(path, "header JSON is nested too deeply to be a checkpoint header") from None
    metadata = header.pop("__metadata__", None) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise fail(path, f"a safetensors file without detector state metadata: {str(metadata)[:200]}")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise fail(path, f"format version {version!r} is not supported (this build reads {FORMAT_VERSION})")
    try:
        skeleton = json.loads(metadata["skeleton"])
    except (KeyError, TypeError, ValueError) as err:
        raise fail(path, f"header holds no valid state skeleton ({err!r})") from err
    except RecursionError:
        raise fail(path, "the state skeleton is nested too deeply to be a checkpoint's") from None
    header_bytes, kind, checksum = _split_checksum(prefix + raw, path)
    tensors = _parse_tensors(header, path)
    expected = 8 + size + (tensors[-1].end if tensors else 0)
    if file_bytes != expected:
        what = "truncated" if file_bytes < expected else "has trailing bytes"
        raise fail(path, f"{what}: the file has {file_bytes} bytes, its header describes {expected}")
    extra = {
        k: v for k, v in metadata.items() if k not in ("format", "format_version", "checksum", "skeleton")
    }
    return Layout(header_bytes, kind, checksum, skeleton, tensors, file_bytes, extra)


def _bad_length(size: int | None, file_bytes: int) -> str:
    if size is None:
        return f"not a checkpoint: {file_bytes} bytes, too short for a safetensors header"
    if size > MAX_HEADER_BYTES:
        return f"not a safetensors file: header length {size} exceeds the {MAX_HEADER_BYTES}-byte limit"
    return f"not a safetensors file, or truncated: header length {size} does not fit in {file_bytes} bytes"


def _split_checksum(header: bytes, path: Path) -> tuple[bytes, str, str]:
    """The header with the checksum digits zeroed, the checksum kind and its digits."""
    if header.count(CHECKSUM_FIELD) != 1:
        raise fail(path, "header has no single checksum field")
    start = header.index(CHECKSUM_FIELD) + len(CHECKSUM_FIELD)
    kind, _, digits = header[start : start + 100].partition(b":")
    if kind.decode("ascii", errors="replace") not in PIECE_DIGESTS:
        raise fail(path, f"unknown checksum kind {kind[:20]!r}; this build knows {sorted(PIECE_DIGESTS)}")
    digits = digits[:64]
    if len(digits) != 64 or digits.strip(b"0123456789abcdef"):
        raise fail(path, f"malformed checksum {digits!r}")
    at = start + len(kind) + 1
    return header[:at] + _PLACEHOLDER + header[at + 64 :], kind.decode(), digits.decode()


def _parse_tensors(header: dict[str, Any], path: Path) -> list[TensorInfo]:
    infos = []
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = (
                DTYPES_BY_CODE[entry["dtype"]],
                tuple(entry["shape"]),
                entry["data_offsets"],
            )
            valid = all(type(n) is int and n >= 0 for n in (*shape, start, end))
        except (KeyError, TypeError, ValueError) as err:
            raise fail(path, f"malformed header entry for tensor {name!r}: {err!r}") from err
        if not valid or end - start != math.prod(shape) * dtype.itemsize:
            raise fail(path, f"header entry for tensor {name!r} is inconsistent: {entry}")
        infos.append(TensorInfo(name, dtype, shape, start, end))
    infos.sort(key=lambda info: info.start)
    offset = 0
    for info in infos:
        if info.start != offset:
            raise fail(path, f"tensor {info.name!r} starts at byte {info.start}, expected {offset}")
        offset = info.end
    return infos
