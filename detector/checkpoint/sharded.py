"""A sharded training state: every rank writes its own shards, committed together as one folder. No pickle.

The sharded layout of a checkpoint (used by FSDP2 with ``save_distributed_checkpoint=True``)::

    checkpoint_latest.safetensors/          a folder, under the same name a full-state file would have
      index.json                            format, world size, files, each sharded tensor's shape and dtype
      state.safetensors                     global rank zero: the whole state, each sharded tensor a marker
      shards/shard-00000-of-00002.safetensors   rank 0's chunk of every sharded tensor, by dotted key path
      shards/shard-00001-of-00002.safetensors   rank 1's ...

Every file is a :mod:`detector.checkpoint.format` file (checksummed, fsynced). A shard file also records its
chunks' global offsets under ``DCP_SHARDING_INFO`` in its header, the Hugging Face layout of
``torch.distributed.checkpoint``, so ``HuggingFaceStorageReader`` reads the chunks a rank needs on
*any* mesh (resharding). The folder is written under a hidden temp name and renamed into place by
rank zero once every rank's files are durable: a kill at any moment leaves the old checkpoint or the
new one. Only DTensor leaves are sharded; plain tensors (optimizer steps, RNG, ...) stay in the state
file. Chunks are stored once: a replicated mesh dimension is written by its coordinate-0 ranks only.

On object storage (:func:`save_sharded_state_to_url`) the folder is a key prefix: every rank uploads its
shard object, rank zero the state object and then ``index.json``; the checkpoint folder's manifest
(:mod:`detector.checkpoint.objects`) names the prefix only after that, which is the commit.
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor

from detector.atomic import fsync_dir, replace_dir, temp_path_for
from detector.checkpoint.collective import broadcast, collectively, rank_world
from detector.checkpoint.compat import DCP_OFFSETS_KEY, local_shape_and_offset
from detector.checkpoint.format import (
    CheckpointFormatError,
    load_state,
    read_header,
    save_state,
    verify_state,
)
from detector.checkpoint.objects import INDEX_NAME, join, put_object, remove, save_state_to_url
from detector.checkpoint.reclaim import drop_cached_pages, reclaim_later
from detector.checkpoint.tree import DTYPE_CODES, DTYPES_BY_CODE

FORMAT = "detector.sharded-state"
FORMAT_VERSION = 1
STATE_NAME = "state.safetensors"
SHARDS_DIR = "shards"
SHARDED_TAG = "__sharded_tensor__"
OFFSETS_KEY = DCP_OFFSETS_KEY


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a folder in the sharded layout (it has an ``index.json``)."""
    return (Path(path) / INDEX_NAME).is_file()


def state_file(path: str | Path) -> Path:
    """The file holding a checkpoint's state tree: ``path`` itself, or a sharded folder's state file."""
    return Path(path) / STATE_NAME if is_sharded_checkpoint(path) else Path(path)


def shard_name(rank: int, world_size: int) -> str:
    """``shards/shard-00001-of-00002.safetensors``: rank 1's file of a 2-rank save."""
    return f"{SHARDS_DIR}/shard-{rank:05d}-of-{world_size:05d}.safetensors"


def split_sharded(state: Any, path: tuple[Any, ...] = ()) -> tuple[Any, dict[str, DTensor]]:
    """``state`` with each DTensor replaced by ``{SHARDED_TAG: key}``, and the DTensors by dotted key path."""
    if isinstance(state, DTensor):
        key = ".".join(map(str, path))
        return {SHARDED_TAG: key}, {key: state}
    found: dict[str, DTensor] = {}
    if isinstance(state, dict):
        items = {}
        for k, value in state.items():
            items[k], more = split_sharded(value, (*path, k))
            found |= more
        return (OrderedDict(items) if isinstance(state, OrderedDict) else items), found
    if isinstance(state, list | tuple):
        values = []
        for i, value in enumerate(state):
            new, more = split_sharded(value, (*path, i))
            values.append(new)
            found |= more
        return type(state)(values), found
    return state, found


def fill_sharded(state: Any, tensors: Mapping[str, Any]) -> Any:
    """The inverse of :func:`split_sharded`: each marker replaced by ``tensors[key]``."""
    if isinstance(state, dict):
        if set(state) == {SHARDED_TAG}:
            return tensors[state[SHARDED_TAG]]
        items = {k: fill_sharded(v, tensors) for k, v in state.items()}
        return OrderedDict(items) if isinstance(state, OrderedDict) else items
    if isinstance(state, list | tuple):
        return type(state)(fill_sharded(v, tensors) for v in state)
    return state


def local_chunk(tensor: DTensor) -> tuple[torch.Tensor, list[int]] | None:
    """This rank's chunk of ``tensor`` and its global offsets; None where another rank stores it.

    Raises:
        CheckpointFormatError: for a ``Partial`` placement (a pending reduction has no stored value).
    """
    coordinate = tensor.device_mesh.get_coordinate()
    if coordinate is None:
        return None
    for dim, placement in enumerate(tensor.placements):
        if placement.is_partial():
            raise CheckpointFormatError(
                f"cannot store a DTensor with a Partial placement: {tensor.placements}"
            )
        if placement.is_replicate() and coordinate[dim] != 0:
            return None
    shape, offset = local_shape_and_offset(tensor)
    local = tensor.to_local()
    if tuple(local.shape) != tuple(shape):
        raise CheckpointFormatError(f"local shard has shape {tuple(local.shape)}, its placement says {shape}")
    return (local, list(offset)) if local.numel() else None


def save_sharded_state(state: Any, folder: str | Path) -> None:
    """Write ``state`` as a sharded checkpoint folder; a collective: every rank calls it with its state.

    Raises:
        CollectiveError: on every rank, if any rank failed to write (its message is included); in one
            process the error itself. Nothing is left at ``folder`` but what was there before.
    """
    folder = Path(folder)
    rank, world_size = rank_world()
    rest, sharded = split_sharded(state)
    tmp = Path(broadcast(str(temp_path_for(folder))))

    def create() -> None:
        if rank == 0:
            (tmp / SHARDS_DIR).mkdir(parents=True)

    def write() -> None:
        drop_cached_pages(folder / shard_name(rank, world_size))  # the old folder's: see reclaim.py
        if rank == 0:
            drop_cached_pages(folder / STATE_NAME)
        tensors, metadata = _shard(sharded)
        save_state(tensors, tmp / shard_name(rank, world_size), metadata=metadata)
        if rank == 0:
            save_state(rest, tmp / STATE_NAME)
            index = _index(world_size, sharded)
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")

    def commit() -> None:
        if rank == 0:
            fsync_dir(tmp / SHARDS_DIR)
            replace_dir(tmp, folder, discard=reclaim_later)  # the old folder is deleted off the save's path

    # Each step is agreed on by every rank (an all-gather of errors), so a rank that fails never leaves
    # the others waiting in a collective, and the folder is committed only once every rank's file is.
    cleanup = partial(shutil.rmtree, tmp, ignore_errors=True)
    collectively(create, f"creating {tmp}", cleanup=cleanup)
    collectively(write, f"saving {folder}", cleanup=cleanup)
    collectively(commit, f"committing {folder}", cleanup=cleanup)


def save_sharded_state_to_url(state: Any, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Upload ``state`` as a sharded checkpoint under the fresh prefix ``url``; a collective, as
    :func:`save_sharded_state`. Every rank uploads its shard object (a multipart upload, streamed),
    rank zero the state object, then, once every rank's upload is complete, ``index.json``.

    Nothing is committed here: the caller names ``url`` in its manifest afterwards.

    Raises:
        CollectiveError: on every rank, if any rank failed (its message is included); rank zero has
            deleted what was uploaded under ``url``. In one process the error itself.
    """
    rank, world_size = rank_world()
    rest, sharded = split_sharded(state)

    def upload() -> None:
        tensors, metadata = _shard(sharded)
        shard = join(url, shard_name(rank, world_size))
        save_state_to_url(tensors, shard, storage_options, metadata=metadata)
        if rank == 0:
            save_state_to_url(rest, join(url, STATE_NAME), storage_options)

    def finish() -> None:
        if rank == 0:
            index = json.dumps(_index(world_size, sharded), indent=1) + "\n"
            put_object(join(url, INDEX_NAME), index.encode("utf-8"), storage_options)

    cleanup = partial(remove, url, storage_options, recursive=True)
    collectively(upload, f"uploading {url}", cleanup=cleanup)
    collectively(finish, f"finishing {url}", cleanup=cleanup)


def _shard(sharded: Mapping[str, DTensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This rank's chunks by key, and the header metadata recording their global offsets."""
    chunks = {key: chunk for key, t in sharded.items() if (chunk := local_chunk(t)) is not None}
    offsets = {key: {"saved_offsets": offset} for key, (_, offset) in chunks.items()}
    return {key: tensor for key, (tensor, _) in chunks.items()}, {OFFSETS_KEY: json.dumps(offsets)}


def read_index(folder: str | Path) -> dict[str, Any]:
    """The parsed ``index.json`` of a sharded checkpoint folder.

    Raises:
        CheckpointFormatError: naming the folder, for a missing or malformed index.
    """
    path = Path(folder) / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointFormatError(f"{path}: not a readable sharded-checkpoint index ({err})") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointFormatError(f"{path}: not a {FORMAT} index")
    if index.get("format_version") != FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{path}: format version {index.get('format_version')!r} is not supported (this build reads "
            f"{FORMAT_VERSION})"
        )
    return index


def verify_sharded_state(folder: str | Path, ranks: tuple[int, int] = (0, 1)) -> None:
    """Check a sharded folder: index, every file's checksum, and that the chunks tile every tensor.

    ``ranks=(rank, world_size)`` verifies only every ``world_size``-th file from ``rank`` on (the
    state file and the tiling on rank 0), so ranks can share the reading.

    Raises:
        CheckpointFormatError: naming the file or tensor and what is wrong.
    """
    folder = Path(folder)
    index = read_index(folder)
    files = [STATE_NAME, *index["shards"]]
    for name in files[ranks[0] :: ranks[1]]:
        if not (folder / name).is_file():
            raise CheckpointFormatError(f"{folder / name}: missing (listed in {folder / INDEX_NAME})")
        verify_state(folder / name)
    if ranks[0] == 0:
        _check_tiling(folder, index)


def load_sharded_state(folder: str | Path, targets: Mapping[str, DTensor] | None = None) -> Any:
    """Read a sharded checkpoint: a collective when ``targets`` is given (every rank calls it).

    Args:
        folder: the checkpoint folder.
        targets: DTensors by dotted key path, filled in place through ``torch.distributed.checkpoint``
            (each rank reads only the chunks its shards overlap, on any mesh); they stand in the
            returned state. Every other sharded tensor is assembled whole on the CPU.

    Raises:
        CheckpointFormatError: for a damaged folder or a target the checkpoint lacks.
        CollectiveError: with ``targets`` under several processes, on every rank, when any rank found
            a damaged file (its message is included).
    """
    folder = Path(folder)
    if targets:  # every rank verifies a share of the files; all raise if any file is damaged
        rank, world_size = rank_world()
        collectively(lambda: verify_sharded_state(folder, (rank, world_size)), f"verifying {folder}")
    else:  # no collective: callable from one rank alone
        verify_sharded_state(folder)
    index = read_index(folder)
    missing = sorted(set(targets or {}) - set(index["tensors"]))
    if missing:
        raise CheckpointFormatError(
            f"{folder}: holds no sharded tensor {missing[:5]} ({len(missing)} missing)"
        )
    if targets:
        from torch.distributed.checkpoint import HuggingFaceStorageReader
        from torch.distributed.checkpoint import load as dcp_load

        dcp_load(dict(targets), storage_reader=HuggingFaceStorageReader(str(folder / SHARDS_DIR)))
    others = [key for key in index["tensors"] if key not in (targets or {})]
    tensors: dict[str, torch.Tensor] = {**(targets or {}), **_assemble(folder, index, others)}
    return fill_sharded(load_state(folder / STATE_NAME), tensors)


def _index(world_size: int, sharded: Mapping[str, DTensor]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "world_size": world_size,
        "state_file": STATE_NAME,
        "shards": [shard_name(r, world_size) for r in range(world_size)],
        "tensors": {k: {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape)} for k, t in sharded.items()},
    }


def _chunks(folder: Path, index: Mapping[str, Any]) -> dict[str, list[tuple[str, list[int], list[int]]]]:
    """Every sharded tensor's chunks: (shard file, global offsets, shape), from the shard headers."""
    found: dict[str, list[tuple[str, list[int], list[int]]]] = {key: [] for key in index["tensors"]}
    for name in index["shards"]:
        header = read_header(folder / name)
        offsets = json.loads(header["metadata"].get(OFFSETS_KEY, "{}"))
        for key, info in header["tensors"].items():
            if key not in found or key not in offsets:
                raise CheckpointFormatError(
                    f"{folder / name}: chunk {key!r} is not in the index or has no offsets"
                )
            found[key].append((name, offsets[key]["saved_offsets"], list(info.shape)))
    return found


def _check_tiling(folder: Path, index: Mapping[str, Any]) -> None:
    for key, chunks in _chunks(folder, index).items():
        shape = index["tensors"][key]["shape"]
        covered = torch.zeros(shape, dtype=torch.int8)
        for _, offset, size in chunks:
            if any(o < 0 or o + s > n for o, s, n in zip(offset, size, shape, strict=True)):
                raise CheckpointFormatError(f"{folder}: a chunk of {key!r} lies outside its shape {shape}")
            covered[tuple(slice(o, o + s) for o, s in zip(offset, size, strict=True))] += 1
        if covered.numel() and not bool((covered == 1).all()):
            raise CheckpointFormatError(f"{folder}: the chunks of {key!r} do not cover it exactly once")


def _assemble(folder: Path, index: Mapping[str, Any], keys: list[str]) -> dict[str, torch.Tensor]:
    """Whole CPU tensors for ``keys``, copied together from their chunks (files verified beforehand).

    Only those chunks are read (safetensors' ``safe_open``), not the rest of each shard file.
    """
    if not keys:
        return {}
    full = {
        k: torch.zeros(index["tensors"][k]["shape"], dtype=DTYPES_BY_CODE[index["tensors"][k]["dtype"]])
        for k in keys
    }
    chunks = _chunks(folder, index)
    for name in index["shards"]:
        with safe_open(str(folder / name), framework="pt") as shard:
            for key in keys:
                for _, offset, size in (c for c in chunks[key] if c[0] == name):
                    where = tuple(slice(o, o + s) for o, s in zip(offset, size, strict=True))
                    full[key][where] = shard.get_tensor(key)
    return full
