"""A bundle's file digests: recorded at export in ``SHA256SUMS``, verified before the bundle is used.

``SHA256SUMS`` is in ``sha256sum`` format (``<hex>  <name>`` per file, sorted), so ``sha256sum -c
SHA256SUMS`` inside the bundle checks it too; after editing a bundle on purpose, regenerate it
(:func:`write_manifest`) or load with ``verify=False`` (``--no-verify``). It guards against
corruption and accidental edits, not forgery, as the checkpoint checksum does.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

import torch

from detector.checkpoint.format import file_kind

MANIFEST_FILE = "SHA256SUMS"
_LINE = re.compile(r"([0-9a-f]{64})  (\S.*)")
_CHUNK = 1 << 20


class BundleIntegrityError(ValueError):
    """A bundle file is missing, altered, unlisted, not a regular file, or holds non-finite weights."""


def file_digest(path: Path) -> str:
    """The SHA-256 of a regular file's bytes, in hex (anything else is refused before it is opened)."""
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = "a link" if stat.S_ISLNK(mode) else file_kind(mode)
        raise BundleIntegrityError(f"{path}: not a regular file but {kind}")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if not path.is_dir() or path.is_symlink()
        if path.name != MANIFEST_FILE or path.parent != folder
    )


def write_manifest(folder: str | Path) -> Path:
    """Write ``folder/SHA256SUMS`` with the digest of every other file under ``folder``."""
    folder = Path(folder)
    lines = (f"{file_digest(folder / name)}  {name}\n" for name in _files(folder))
    manifest = folder / MANIFEST_FILE
    manifest.write_text("".join(lines), encoding="utf-8")
    return manifest


def read_manifest(folder: Path) -> dict[str, str]:
    """``{file name: hex digest}`` from ``folder/SHA256SUMS``; a missing or malformed one is refused."""
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        raise BundleIntegrityError(
            f"{manifest}: missing, so the bundle's files cannot be verified (a bundle written before "
            "digests were recorded, or not a bundle); load it with verify=False (--no-verify) if you trust it"
        )
    recorded = {}
    for number, line in enumerate(manifest.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        match = _LINE.fullmatch(line)
        name = match.group(2) if match else ""
        if not match or Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleIntegrityError(f"{manifest}:{number}: not a '<sha256>  <file>' line: {line[:80]!r}")
        recorded[name] = match.group(1)
    return recorded


def verify_bundle(folder: str | Path) -> None:
    """Check every file of a bundle against ``SHA256SUMS``: none missing, altered or unlisted.

    Raises:
        BundleIntegrityError: naming the first file that fails and how.
    """
    folder = Path(folder)
    recorded = read_manifest(folder)
    for name, expected in recorded.items():
        path = folder / name
        if not os.path.lexists(path):
            raise BundleIntegrityError(f"{path}: missing (recorded in {MANIFEST_FILE})")
        actual = file_digest(path)
        if actual != expected:
            raise BundleIntegrityError(
                f"{path}: SHA-256 mismatch, the file is corrupt or was edited "
                f"(recorded {expected[:16]}..., computed {actual[:16]}...)"
            )
    unlisted = [name for name in _files(folder) if name not in recorded]
    if unlisted:
        raise BundleIntegrityError(f"{folder / unlisted[0]}: not recorded in {MANIFEST_FILE}")


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], where: str | Path) -> None:
    """Refuse weights holding NaN or infinity: such a model scores every text alike, without a word.

    Raises:
        BundleIntegrityError: naming ``where`` and the first tensor at fault.
    """
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise BundleIntegrityError(
                f"{where}: tensor {name!r} holds {count} non-finite value(s) (NaN/inf)"
            )
