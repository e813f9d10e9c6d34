"""One run per output folder: a fresh ``fit`` never writes where an earlier run's checkpoints are."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from detector.checkpoint import objects
from detector.checkpoint.topk import LATEST_NAME, SUFFIX

CHECKPOINT_PREFIX = "checkpoint_"


class RunFolderError(FileExistsError):
    """A fresh run would write where an earlier run's files are; it was refused before training."""


class LastCheckpointError(FileNotFoundError):
    """``--ckpt_path last`` where the checkpoint folder holds no ``checkpoint_latest``."""


def earlier_checkpoints(dirpath: str | Path, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Names of the committed checkpoints (files or sharded folders) in ``dirpath``, sorted; no temps.

    For an object-store URL: the names in its manifest (:mod:`detector.checkpoint.objects`).
    """
    if objects.is_url(dirpath):
        return sorted(objects.read_manifest(str(dirpath), storage_options))
    dirpath = Path(dirpath)
    if not dirpath.is_dir():
        return []
    return sorted(
        p.name for p in dirpath.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and p.name.endswith(SUFFIX)
    )


def refusal(folder: str | Path, what: str, names: Sequence[str], ways: str | None = None) -> RunFolderError:
    """The one-line error for a run that would mix its files with another run's in ``folder``.

    ``ways`` replaces the default ways on (resume that run, or another output folder).
    """
    shown = ", ".join([*names[:3], *(["..."] if len(names) > 3 else [])])
    ways = ways or "resume that run with `--ckpt_path last`"
    return RunFolderError(
        f"{folder} already holds {what} of another run ({shown}); nothing was written. To go on: {ways}, "
        "or run this one in another output folder (`--trainer.default_root_dir OTHER`)."
    )


def checkpoint_exists(path: str | Path, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``path`` is a checkpoint file, a sharded folder, or a checkpoint on an object store."""
    if objects.is_url(path):
        return objects.exists(str(path), storage_options)
    return Path(objects.local(path)).exists()


def resolve_last(dirpath: str | Path, storage_options: Mapping[str, Any] | None = None) -> str:
    """``dirpath/checkpoint_latest.safetensors`` (a file, a sharded folder or a manifest name on an object
    store); LastCheckpointError naming the folder when there is none."""
    latest = (
        objects.join(str(dirpath), LATEST_NAME) if objects.is_url(dirpath) else Path(dirpath) / LATEST_NAME
    )
    if not checkpoint_exists(latest, storage_options):
        raise LastCheckpointError(
            f"--ckpt_path last: no {LATEST_NAME} in {dirpath}, so there is no run to resume; "
            "start a new run without --ckpt_path, or give the path of a checkpoint."
        )
    return str(latest)
