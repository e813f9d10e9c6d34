"""Where an artefact came from: package versions, git commit, UTC time."""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "detector",
    "torch",
    "lightning",
    "transformers",
    "tokenizers",
    "safetensors",
    "torchmetrics",
    "numpy",
    "onnx",
    "onnxscript",
    "onnxruntime",
)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution in ``names``; None when it is not installed."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(folder: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=folder, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def git_state(folder: str | Path | None = None) -> dict[str, str | bool | None]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the git checkout holding ``folder``.

    ``folder`` defaults to the checkout holding this package; outside any checkout both are None.
    """
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    commit = _git(folder, "rev-parse", "HEAD")
    if not commit:
        return {"commit": None, "dirty": None}
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second, e.g. ``2026-11-28T06:50:00Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
