"""Bundles on object storage: uploaded file by file with ``SHA256SUMS`` last, read from a verified local copy.

An object store has no folder rename, so a bundle cannot appear at once as on a disk. It is written
(and checked) in a local temp folder, then each file is uploaded under ``root/name/``, and the
``SHA256SUMS`` object (:mod:`detector.bundle.integrity`) goes last: it is the marker. A reader
requires it, so a folder whose upload was cut short is not a bundle (loading refuses it, naming its
URL), and once it is there every file it lists is too; loading then verifies every file against it.
An existing bundle (one with the marker) is never overwritten; the leftovers of a cut-short upload
under the same name are replaced.
"""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from detector.bundle.integrity import MANIFEST_FILE, BundleIntegrityError
from detector.checkpoint.objects import download_folder, filesystem, fresh_find, join, reaching

MARKER = MANIFEST_FILE


_copies: dict[tuple[str, str], Path] = {}


def _version(url: str, storage_options: Mapping[str, Any] | None) -> str | None:
    """The bundle's files and their ETags (one LIST), or None without a marker (no bundle, or an
    unfinished upload)."""
    with reaching(url):
        fs, path = filesystem(url, storage_options)
        found = fresh_find(fs, path, detail=True)
    if f"{path.rstrip('/')}/{MARKER}" not in found:
        return None
    tags = (
        str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("size"))
        for info in found.values()
    )
    return repr(sorted(zip(found, tags, strict=True)))


def is_complete(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether the bundle at ``url`` has its marker: its upload completed."""
    return _version(url, storage_options) is not None


def upload_bundle(local: Path, url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Upload the bundle folder ``local`` to ``url``, ``SHA256SUMS`` last; returns ``url``.

    Raises:
        FileExistsError: ``url`` already holds a complete bundle (the caller's BundleExistsError).
    """
    if is_complete(url, storage_options):
        raise FileExistsError(f"bundle {url} exists; bundles are never overwritten")
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != MARKER)
    with reaching(url):
        fs, path = filesystem(url, storage_options)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=True)  # a cut-short upload's leftovers: never a bundle
        for file in files:
            fs.put_file(str(file), f"{path}/{file.relative_to(local).as_posix()}")
        fs.put_file(str(local / MARKER), f"{path}/{MARKER}")
    return url


@contextlib.contextmanager
def local_bundle_root() -> Iterator[Path]:
    """A local temp folder to write a bundle into before its upload; removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="detector-bundle-") as folder:
        yield Path(folder)


def download_bundle(url: str, storage_options: Mapping[str, Any] | None = None) -> Path:
    """A local copy of the complete bundle at ``url`` (removed at exit), to load and verify as usual.

    Raises:
        BundleIntegrityError: ``url`` has no ``SHA256SUMS`` marker (not a bundle, or one whose upload
            has not completed).
    """
    url = url.rstrip("/")
    version = _version(url, storage_options)
    if version is None:
        raise BundleIntegrityError(
            f"{join(url, MARKER)}: missing, so {url} is not a bundle or its upload has not completed"
        )
    cached = _copies.get((url, version))
    if cached is not None and cached.is_dir():
        return cached
    local = download_folder() / uuid.uuid4().hex / url.rsplit("/", 1)[-1]
    with reaching(url):
        fs, path = filesystem(url, storage_options)
        fs.get(path + "/", str(local) + "/", recursive=True)
    _copies[(url, version)] = local
    return local


def named_as(error: BaseException, local: Path, url: str) -> BaseException:
    """``error`` (a refusal about the local copy) as the same refusal naming ``url``."""
    return type(error)(str(error).replace(str(local), url))


def complete_bundles(root: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Names of the complete bundles (marker there) directly under ``root``, sorted (one LIST)."""
    with reaching(root):
        fs, path = filesystem(root, storage_options)
        found = fresh_find(fs, path)
    prefix = path.rstrip("/") + "/"
    names = (key.removeprefix(prefix).split("/") for key in found if key.startswith(prefix))
    return sorted(parts[0] for parts in names if len(parts) == 2 and parts[1] == MARKER)


def read_file(url: str, name: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The bytes of the file ``name`` of the bundle at ``url`` (one GET); FileNotFoundError if absent."""
    with reaching(url):
        fs, path = filesystem(url, storage_options)
        return bytes(fs.cat_file(f"{path.rstrip('/')}/{name}"))


def remove_bundle(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete the bundle at ``url``: its marker first, so from that request on it is no bundle, then the
    rest. Deleting what is already gone is done, not an error."""
    with reaching(url):
        fs, path = filesystem(url, storage_options)
        path = path.rstrip("/")
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(f"{path}/{MARKER}")
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=True)
        fs.invalidate_cache(path)


def move_bundle(url: str, to: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """The object store's "rename" of the complete bundle at ``url`` to ``to``: every file copied on the
    server (no download), the marker last, then ``url`` removed marker first. A reader sees each of
    the two either whole or not at all; a kill in between leaves both whole."""
    with reaching(url):
        fs, path = filesystem(url, storage_options)
        _, target = filesystem(to, storage_options)
        path, target = path.rstrip("/"), target.rstrip("/")
        fs.invalidate_cache(path)
        files = [key for key in fs.find(path) if key != f"{path}/{MARKER}"]
        with contextlib.suppress(FileNotFoundError):
            fs.rm(target, recursive=True)  # a cut-short copy's leftovers: never a bundle
        for key in files:
            fs.copy(key, target + key.removeprefix(path))
        fs.copy(f"{path}/{MARKER}", f"{target}/{MARKER}")
        fs.invalidate_cache(target)
    remove_bundle(url, storage_options)
