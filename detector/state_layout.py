"""The bytes of a checkpoint file: a standard safetensors file whose header also carries the state.

Every tensor of the state is a safetensors tensor (the biggest dtypes first, so each one is aligned);
the header's ``__metadata__`` holds ``format``, ``format_version``, ``checksum`` and ``skeleton`` (the
JSON tree of :mod:`detector.state_tree`). Any safetensors reader can open the file.

Checksum: ``sha256-tree``, the SHA-256 of (the 8-byte length prefix + the header, with the checksum's
64 hex digits written as zeros) followed by the SHA-256 digests of the data pieces (each tensor's
bytes, cut in 16 MiB pieces). SHA-256 because OpenSSL runs it on the CPU's SHA extensions: 1.15 GB/s
on one core of the development machine, blake2b 0.51 GB/s; a CRC32 is faster but its 32 bits are thin
for multi-gigabyte files. The pieces are what makes it fast: they are hashed in worker threads
(hashlib releases the GIL), in parallel with each other and with the disk I/O, on save and on load.
The header is covered too, so a flipped byte anywhere in the file is caught. It guards against
corruption, not forgery: anyone who can write the file can recompute it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from detector.state_tree import DTYPE_CODES, CheckpointFormatError

FORMAT_NAME = "detector.state"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100_000_000  # the same bound safetensors itself enforces
PIECE_BYTES = 16 << 20
CHECKSUM_KIND = "sha256-tree"
CHECKSUM_FIELD = f'"checksum":"{CHECKSUM_KIND}:'.encode()
_PLACEHOLDER = "0" * 64
_WORKERS = max(1, min(8, os.cpu_count() or 1))
_THREADED_PIECE_BYTES = 1 << 20
_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
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
    header: bytes  # length prefix + header JSON, checksum digits zeroed
    checksum: str
    skeleton: Any
    tensors: list[TensorInfo]
    file_bytes: int


class PieceHasher:
    """SHA-256 of each piece, big ones in worker threads with a few in flight; see the module docstring."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None  # started at the first big piece
        self._pending: deque[Future[bytes] | bytes] = deque()
        self._digests: list[bytes] = []

    def feed(self, piece: memoryview) -> None:
        if len(self._pending) >= 2 * _WORKERS:
            self._digests.append(_result(self._pending.popleft()))
        if len(piece) < _THREADED_PIECE_BYTES:  # a thread hand-off costs more than hashing it here
            self._pending.append(_sha256(piece))
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="checkpoint-hash")
        self._pending.append(self._pool.submit(_sha256, piece))

    def hexdigest(self, header: bytes) -> str:
        while self._pending:
            self._digests.append(_result(self._pending.popleft()))
        total = hashlib.sha256(header)
        for digest in self._digests:
            total.update(digest)
        return total.hexdigest()

    def __enter__(self) -> PieceHasher:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _result(pending: Future[bytes] | bytes) -> bytes:
    return pending if isinstance(pending, bytes) else pending.result()


def _sha256(piece: memoryview) -> bytes:
    return hashlib.sha256(piece).digest()


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, in C order; copies only a tensor that is not already a contiguous CPU one."""
    tensor = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def plan_tensors(tensors: dict[str, torch.Tensor]) -> list[TensorInfo]:
    infos, offset = [], 0
    for name in sorted(tensors, key=lambda name: -tensors[name].element_size()):
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        infos.append(TensorInfo(name, tensor.dtype, tuple(tensor.shape), offset, offset + nbytes))
        offset += nbytes
    return infos


def encode_header(infos: list[TensorInfo], skeleton: Any) -> bytes:
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "checksum": f"{CHECKSUM_KIND}:{_PLACEHOLDER}",
        "skeleton": json.dumps(skeleton, allow_nan=False, separators=(",", ":")),
    }
    header: dict[str, Any] = {"__metadata__": metadata}
    for info in infos:
        header[info.name] = {
            "dtype": DTYPE_CODES[info.dtype],
            "shape": info.shape,
            "data_offsets": [info.start, info.end],
        }
    raw = json.dumps(header, separators=(",", ":")).encode("ascii")
    raw += b" " * (-len(raw) % 8)  # safetensors allows trailing spaces; keeps the data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def fail(path: Path, problem: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path}: {problem}")


def read_layout(f: io.FileIO, path: Path) -> Layout:
    file_bytes = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
    if size is None or size > MAX_HEADER_BYTES or size > file_bytes - 8:
        if prefix[:4] == b"PK\x03\x04" or prefix[:1] == b"\x80":  # zip (torch.save) or raw pickle
            raise fail(path, _PICKLE_REFUSED)
        raise fail(path, _bad_length(size, file_bytes))
    raw = f.read(size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise fail(path, f"header is not valid JSON ({err})") from err
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
    header_bytes, checksum = _split_checksum(prefix + raw, path)
    tensors = _parse_tensors(header, path)
    expected = 8 + size + (tensors[-1].end if tensors else 0)
    if file_bytes != expected:
        what = "truncated" if file_bytes < expected else "has trailing bytes"
        raise fail(path, f"{what}: the file has {file_bytes} bytes, its header describes {expected}")
    return Layout(header_bytes, checksum, skeleton, tensors, file_bytes)


def _bad_length(size: int | None, file_bytes: int) -> str:
    if size is None:
        return f"not a checkpoint: {file_bytes} bytes, too short for a safetensors header"
    if size > MAX_HEADER_BYTES:
        return f"not a safetensors file: header length {size} exceeds the {MAX_HEADER_BYTES}-byte limit"
    return f"not a safetensors file, or truncated: header length {size} does not fit in {file_bytes} bytes"


def _split_checksum(header: bytes, path: Path) -> tuple[bytes, str]:
    if header.count(CHECKSUM_FIELD) != 1:
        raise fail(path, f"header has no single {CHECKSUM_KIND} checksum field")
    at = header.index(CHECKSUM_FIELD) + len(CHECKSUM_FIELD)
    checksum = header[at : at + 64].decode("ascii", errors="replace")
    if len(checksum) != 64 or any(c not in "0123456789abcdef" for c in checksum):
        raise fail(path, f"malformed checksum {checksum!r}")
    return header[:at] + _PLACEHOLDER.encode() + header[at + 64 :], checksum


def _parse_tensors(header: dict[str, Any], path: Path) -> list[TensorInfo]:
    infos = []
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = _DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
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


def read_into(f: io.FileIO, piece: memoryview) -> bool:
    done = 0
    while done < len(piece):
        n = f.readinto(piece[done:])
        if not n:
            return False
        done += n
    return True
