"""One reading API over both checkpoint layouts: a full-state file and a sharded folder.

Tools, exports, evaluation and single-device resumes read a checkpoint through these functions and
never need to know how it was written: a sharded folder (:mod:`detector.checkpoint.sharded`) is
assembled into the same dict a full-state file holds, its optimizer state keyed by parameter
position as ``Optimizer.state_dict()`` keys it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from detector.atomic import TEMP_MARKER
from detector.checkpoint.format import load_state, read_header, verify_state
from detector.checkpoint.objects import through_local_copy
from detector.checkpoint.sharded import (
    is_sharded_checkpoint,
    load_sharded_state,
    state_file,
    verify_sharded_state,
)


@through_local_copy
def load_checkpoint_state(path: str | Path, map_location: str | torch.device | None = "cpu") -> Any:
    """The whole state of a checkpoint file or sharded folder, checksums verified. Runs no pickle.

    Raises:
        CheckpointFormatError: naming the file and what is wrong.
    """
    if not is_sharded_checkpoint(path):
        return load_state(path, map_location=map_location)
    state = load_sharded_state(path)
    if isinstance(state, dict) and isinstance(state.get("optimizer_states"), list):
        state["optimizer_states"] = [optimizer_state_by_position(s) for s in state["optimizer_states"]]
    if map_location is not None and torch.device(map_location).type != "cpu":
        state = _to(state, torch.device(map_location))
    return state


@through_local_copy
def read_checkpoint_header(path: str | Path) -> dict[str, Any]:
    """:func:`detector.checkpoint.format.read_header` of the file holding the checkpoint's state tree."""
    return read_header(state_file(path))


@through_local_copy
def verify_checkpoint(path: str | Path) -> None:
    """Verify a checkpoint file, or every file of a sharded folder and how its chunks tile each tensor."""
    if is_sharded_checkpoint(path):
        verify_sharded_state(path)
    else:
        verify_state(path)


def disk_usage(folder: str | Path) -> int:
    """Bytes held by the regular files under ``folder``, each inode counted once (hard links share one).

    Temporary files and folders of an unfinished write (:data:`detector.atomic.TEMP_MARKER`), and
    everything inside such a folder, are left out; a missing folder holds 0 bytes.
    """
    seen: dict[tuple[int, int], int] = {}
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for path in folder.rglob("*"):
        in_temp = any(TEMP_MARKER in part for part in path.relative_to(folder).parts)
        if in_temp or path.is_symlink() or not path.is_file():
            continue
        stat = path.stat()
        seen[(stat.st_dev, stat.st_ino)] = stat.st_size
    return sum(seen.values())


def optimizer_state_by_position(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (a sharded save's) re-keyed 0, 1, ... in group order."""
    names = [name for group in state["param_groups"] for name in group["params"]]
    if all(isinstance(name, int) for name in names):
        return state
    position = {name: i for i, name in enumerate(names)}
    return {
        "state": {position[name]: value for name, value in state["state"].items()},
        "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in state["param_groups"]],
    }


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return type(value)((k, _to(v, device)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return type(value)(_to(v, device) for v in value)
    return value
