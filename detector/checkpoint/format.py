"""Save and load a whole training state as one checkpoint file: streamed, atomic, checksummed, no pickle.

Saving streams the state tensor by tensor into a temp file beside the target (no second copy of the
state in memory; the checksum field is reserved at a fixed width in the header and patched once the
data is written), then commits it atomically (:mod:`detector.atomic`); a replaced file's blocks are
freed after the commit, off the save's critical path (:mod:`detector.checkpoint.reclaim`). Loading
reads each tensor once into its own memory while digesting it and compares the checksum before
anything is returned. The file layout is described in :mod:`detector.checkpoint.layout`, the checksum
in :mod:`detector.checkpoint.pieces`.
"""

from __future__ import annotations

import contextlib
import mmap as mmap_module
import os
import stat
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.atomic import commit_file, temp_path_for
from detector.checkpoint.layout import (
    FORMAT_VERSION,
    Layout,
    TensorInfo,
    encode_header,
    fail,
    plan_tensors,
    read_layout,
)
from detector.checkpoint.pieces import (
    DEFAULT_CHECKSUM,
    PIECE_DIGESTS,
    PiecePipeline,
    byte_view,
    digest_extents,
    pieces,
    read_at,
    tree_hexdigest,
    write_at,
)
from detector.checkpoint.reclaim import drop_cached_pages, reclaim_later, set_aside
from detector.checkpoint.tree import CheckpointFormatError, flatten_state, unflatten_state

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


def save_state(
    state: Any, path: str | Path, checksum: str = DEFAULT_CHECKSUM, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``state`` to ``path`` atomically: the previous file stays intact until the new one is durable.

    Args:
        state: a nested tree of tensors, NumPy arrays and JSON-like values (:mod:`detector.checkpoint.tree`).
        path: the final file; a temp file beside it is written, fsynced and renamed onto it.
        checksum: ``"xxh3-tree"`` (fastest), ``"crc32-tree"`` or ``"sha256-tree"``; see
            :mod:`detector.checkpoint.pieces`.
        metadata: extra string entries for the safetensors ``__metadata__`` (covered by the checksum),
            e.g. the shard offsets that :mod:`detector.checkpoint.sharded` adds for other readers.

    Raises:
        CheckpointFormatError: for a value that cannot be stored (the message names its key path).
        ValueError: for an unknown ``checksum`` kind.
    """
    if checksum not in PIECE_DIGESTS:
        raise ValueError(f"checksum must be one of {sorted(PIECE_DIGESTS)}, got {checksum!r}")
    path = Path(path)
    tensors, skeleton = flatten_state(state)
    infos = plan_tensors(tensors)
    header, digits_at = encode_header(infos, skeleton, checksum, metadata or {})
    tmp = temp_path_for(path)
    drop_cached_pages(path)  # the old file's pages would crowd the cache the new one is written into
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            os.ftruncate(fd, len(header) + (infos[-1].end if infos else 0))
            write_at(fd, memoryview(header), 0)
            with PiecePipeline(checksum) as pipeline:
                for info in infos:
                    for start, piece in pieces(byte_view(tensors[info.name])):
                        offset = len(header) + info.start + start
                        pipeline.submit(partial(write_at, fd, piece, offset), piece)
                digest = pipeline.hexdigest(header)
            write_at(fd, memoryview(digest.encode("ascii")), digits_at)
        finally:
            os.close(fd)
        _commit(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:  # name the file
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def _commit(tmp: Path, path: Path) -> None:
    """Commit ``tmp`` onto ``path``; the replaced file's blocks are freed in the background afterwards."""
    old = set_aside(path)
    try:
        commit_file(tmp, path)
    except BaseException:
        if old is not None:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        raise
    if old is not None:
        reclaim_later(old)


def load_state(path: str | Path, map_location: str | torch.device | None = "cpu", mmap: bool = False) -> Any:
    """Read a state written by :func:`save_state`, after verifying its checksum. Runs no pickle.

    Args:
        path: the checkpoint file.
        map_location: the device the tensors are moved to (``None``: the CPU).
        mmap: ``False`` (default): every tensor gets its own memory and nothing stays tied to the file.
            ``True``: CPU tensors are views of a private (copy-on-write) mapping of the file: faster
            and lighter for reading, but they keep the file's disk space in use while they live
            (even after the file is deleted or replaced), and a process that rewrites the file in
            place (``open(path, "wb")``, never this module) would change or crash them.

    Raises:
        CheckpointFormatError: naming the file and what is wrong, for a truncated, corrupt, foreign or
            non-safetensors file (a pickled ``.ckpt`` included: it is refused, never unpickled).
        ValueError: for a ``map_location`` that is not a device.
    """
    device = _device(map_location)
    path = Path(path)
    with _open(path) as fd:
        layout = read_layout(fd, path)
        tensors = (_map_data if mmap else _read_data)(fd, layout, path)
    if device.type != "cpu":
        tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    return _unflatten(path, tensors, layout.skeleton)


def verify_state(path: str | Path) -> None:
    """Check that ``path`` is an intact checkpoint (layout and checksum), reading it through a mapping.

    Raises:
        CheckpointFormatError: naming the file and what is wrong.
    """
    path = Path(path)
    with _open(path) as fd:
        layout = read_layout(fd, path)
        _map_data(fd, layout, path)
    _unflatten(path, {info.name: info for info in layout.tensors}, layout.skeleton)


def read_header(path: str | Path) -> dict[str, Any]:
    """The header of a checkpoint, without reading (or verifying) its tensor data.

    Returns:
        ``format_version``, ``checksum`` (``kind:hex``), ``file_bytes``, ``data_offset`` (where the
        tensor data starts), ``tensors`` (name -> :class:`TensorInfo`), ``metadata`` (the extra
        ``__metadata__`` entries given to :func:`save_state`) and ``state``: the state tree with a
        :class:`TensorInfo` in place of each tensor or array.
    """
    path = Path(path)
    with _open(path) as fd:
        layout = read_layout(fd, path)
    infos = {info.name: info for info in layout.tensors}
    return {
        "format_version": FORMAT_VERSION,
        "checksum": f"{layout.checksum_kind}:{layout.checksum}",
        "file_bytes": layout.file_bytes,
        "data_offset": len(layout.header),
        "tensors": infos,
        "metadata": dict(layout.extra),
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


def _read_data(fd: int, layout: Layout, path: Path) -> dict[str, torch.Tensor]:
    """Read each tensor into its own memory while digesting it, then check the checksum."""
    tensors = {}
    with PiecePipeline(layout.checksum_kind) as pipeline:
        for info in layout.tensors:
            tensors[info.name] = tensor = torch.empty(info.shape, dtype=info.dtype)
            for start, piece in pieces(byte_view(tensor)):
                offset = len(layout.header) + info.start + start
                pipeline.submit(partial(read_at, fd, piece, offset, path, f"tensor {info.name!r}"), piece)
        digest = pipeline.hexdigest(layout.header)
    _check(path, layout, digest)
    return tensors


def _map_data(fd: int, layout: Layout, path: Path) -> dict[str, torch.Tensor]:
    """Tensors over a private mapping of the file, digested in place; then check the checksum."""
    mapped = mmap_module.mmap(
        fd, 0, access=mmap_module.ACCESS_COPY
    )  # copy-on-write: tensor writes never reach the file
    with contextlib.suppress(OSError, AttributeError):  # a cold file: read ahead while the hashing starts
        mapped.madvise(mmap_module.MADV_WILLNEED)
    base = len(layout.header)
    extents = [(base + info.start, info.nbytes) for info in layout.tensors]
    _check(
        path,
        layout,
        tree_hexdigest(layout.header, digest_extents(layout.checksum_kind, memoryview(mapped), extents)),
    )
    tensors = {}
    for info in layout.tensors:
        if info.nbytes == 0:
            tensors[info.name] = torch.empty(info.shape, dtype=info.dtype)
            continue
        data = torch.frombuffer(mapped, dtype=torch.uint8, count=info.nbytes, offset=base + info.start)
        tensors[info.name] = data.view(info.dtype).reshape(info.shape)
    return tensors


def _check(path: Path, layout: Layout, digest: str) -> None:
    if digest != layout.checksum:
        stored = f"{layout.checksum_kind}:{layout.checksum}"
        raise fail(path, f"checksum mismatch, the file is corrupt (stored {stored}, computed {digest})")


@contextlib.contextmanager
def _open(path: Path) -> Iterator[int]:
    # O_NONBLOCK: opening a FIFO must not wait for a writer; the type is checked before any read.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise fail(path, f"cannot be opened: {err.strerror}") from err
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise fail(path, f"not a regular file but {file_kind(mode)}; a checkpoint is a file")
        os.set_blocking(fd, True)
        yield fd
    finally:
        os.close(fd)


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words, for errors."""
    if stat.S_ISDIR(mode):
        return "a folder (a sharded checkpoint folder holds index.json)"
    return "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device, socket or other special file"


def _unflatten(path: Path, tensors: dict[str, Any], skeleton: Any) -> Any:
    try:
        return unflatten_state(tensors, skeleton)
    except CheckpointFormatError as err:
        raise fail(path, str(err)) from err
    except RecursionError:
        raise fail(path, "the state skeleton is nested too deeply to be a checkpoint's") from None


def _device(map_location: str | torch.device | None) -> torch.device:
    if map_location is None:
        return torch.device("cpu")
    if isinstance(map_location, str | torch.device):
        return torch.device(map_location)
    raise ValueError(f"map_location must be a device or a device name, got {map_location!r}")
