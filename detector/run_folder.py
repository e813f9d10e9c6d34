"""One run per output folder: a fresh ``fit`` never writes where an earlier run's checkpoints are."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from detector.checkpoint.topk import LATEST_NAME, SUFFIX

CHECKPOINT_PREFIX = "checkpoint_"


class RunFolderError(FileExistsError):
    """A fresh run would write where an earlier run's files are; it was refused before training."""


class LastCheckpointError(FileNotFoundError):
    """``--ckpt_path last`` where the checkpoint folder holds no ``checkpoint_latest``."""


def earlier_checkpoints(dirpath: str | Path) -> list[str]:
    """Names of the committed checkpoints (files or sharded folders) in ``dirpath``, sorted; no temps."""
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


def resolve_last(dirpath: str | Path) -> Path:
    """``dirpath/checkpoint_latest.safetensors`` (a file or a sharded folder); LastCheckpointError naming
    the folder when there is none."""
    latest = Path(dirpath) / LATEST_NAME
    if not latest.exists():
        raise LastCheckpointError(
            f"--ckpt_path last: no {LATEST_NAME} in {dirpath}, so there is no run to resume; "
            "start a new run without --ckpt_path, or give the path of a checkpoint."
        )
    return latest
