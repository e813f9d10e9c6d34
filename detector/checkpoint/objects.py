"""Checkpoints on object storage (``s3://``, ``gs://``, any fsspec URL): upload, manifest, verified reads.

An object store has no rename and no hard link, and an object appears whole when its upload completes
(a killed upload leaves nothing visible). So a state is uploaded once, as a new object under a unique
key in ``states/`` (a multipart upload fed tensor by tensor: at most one part in memory besides the
state), and only then does the small manifest object ``checkpoints.json`` (one PUT, so it too appears
whole) give it its names: ``checkpoint_latest.safetensors``, the best, the top K, the periodic ones. A
reader resolves a name through the manifest; an object whose key is a name's was written by someone
else and is read as it is. A key may also be a folder prefix (a sharded checkpoint: one object per
file, ``index.json`` uploaded last), which counts as one checkpoint: kept, downloaded and deleted
whole. Objects that no name points at any more are deleted after the manifest that drops them is
written. Reading downloads the object (or the folder) into a per-process temp folder once per version
(ETags) and reads it with :mod:`detector.checkpoint.format`, checksum verified; errors name the
object's URL. ``file://`` URLs and plain paths never come here.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from fsspec.core import split_protocol, url_to_fs

from detector.checkpoint.collective import CollectiveError
from detector.checkpoint.layout import encode_header, plan_tensors
from detector.checkpoint.pieces import DEFAULT_CHECKSUM, PIECE_DIGESTS, PiecePipeline, byte_view, pieces
from detector.checkpoint.tree import CheckpointFormatError, flatten_state

MANIFEST_NAME = "checkpoints.json"
INDEX_NAME = "index.json"  # a folder checkpoint's index (detector.checkpoint.sharded), its last object
MANIFEST_FORMAT = "detector.checkpoints"
STATES_FOLDER = "states"
PART_BYTES = 64 << 20  # one multipart-upload part; S3 allows 10,000 parts, so states up to 640 GB
_LOCAL_PROTOCOLS = {None, "file", "local"}
_Result = TypeVar("_Result")


class ObjectStoreError(OSError):
    """The object store could not be reached or refused a request (credentials, bucket, network)."""


def is_url(path: Any) -> bool:
    """Whether ``path`` is a URL of a remote filesystem (``s3://...``); plain paths and ``file://`` aren't."""
    return isinstance(path, str) and split_protocol(path)[0] not in _LOCAL_PROTOCOLS


def local(path: Any) -> Any:
    """``path`` without a ``file://`` scheme (a local path as the filesystem sees it); else unchanged."""
    if isinstance(path, str) and split_protocol(path)[0] in ("file", "local"):
        return split_protocol(path)[1]
    return path


def join(url: str, *names: str) -> str:
    """``url/name/...`` with exactly one slash between parts."""
    return "/".join([url.rstrip("/"), *(name.strip("/") for name in names)])


def _split(url: str) -> tuple[str, str]:
    parent, _, name = url.rstrip("/").rpartition("/")
    return parent, name


@contextlib.contextmanager
def reaching(url: str) -> Iterator[None]:
    """Turns the store's own errors (no credentials, no bucket, refused) into one-line ObjectStoreErrors."""
    try:
        yield
    except (CheckpointFormatError, ObjectStoreError, FileNotFoundError):
        raise
    except Exception as error:
        if isinstance(error, OSError) or type(error).__module__.split(".")[0] in (
            "botocore",
            "aiobotocore",
            "s3fs",
            "gcsfs",
            "google",
            "aiohttp",
        ):
            raise ObjectStoreError(
                f"{url}: the object store refused or could not be reached: {error}"
            ) from error
        raise


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """``(fsspec filesystem, path within it)`` for ``url``; the endpoint and credentials come as the
    filesystem's users expect (environment, config files) or from ``storage_options``."""
    return url_to_fs(url, **dict(storage_options or {}))


def save_state_to_url(
    state: Any,
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    checksum: str = DEFAULT_CHECKSUM,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Upload ``state`` as one object at ``url``, in :func:`~detector.checkpoint.format.save_state`'s format.

    The checksum sits in the header, which goes first: a pass over the tensors in memory computes it
    (no I/O), then the header and the tensors stream into a multipart upload, ``PART_BYTES`` at a
    time. A failed upload is aborted, so nothing appears at ``url``. ``metadata``: extra header entries.
    """
    if checksum not in PIECE_DIGESTS:
        raise ValueError(f"checksum must be one of {sorted(PIECE_DIGESTS)}, got {checksum!r}")
    tensors, skeleton = flatten_state(state)
    infos = plan_tensors(tensors)
    header, digits_at = encode_header(infos, skeleton, checksum, metadata)
    with PiecePipeline(checksum) as pipeline:
        for info in infos:
            for _, piece in pieces(byte_view(tensors[info.name])):
                pipeline.submit(_nothing, piece)
        digest = pipeline.hexdigest(header)
    header = header[:digits_at] + digest.encode("ascii") + header[digits_at + len(digest) :]
    with reaching(url):
        fs, path = filesystem(url, storage_options)
        upload = fs.open(path, "wb", block_size=PART_BYTES)
        try:
            upload.write(header)
            for info in infos:
                _send(upload, info.name, tensors[info.name])
        except BaseException:
            _abort(upload, fs, path)
            raise
        upload.close()


def _send(upload: Any, name: str, tensor: Any) -> None:
    """Feed one tensor's bytes to the upload (a part goes out each time ``PART_BYTES`` are buffered)."""
    for _, piece in pieces(byte_view(tensor)):
        upload.write(piece)


def _nothing() -> None:
    """The I/O of a piece digested in memory: none."""


def _abort(upload: Any, fs: Any, path: str) -> None:
    """Drop an unfinished upload; a store without multipart aborts gets the partial object removed."""
    with contextlib.suppress(Exception):
        if hasattr(upload, "discard"):
            upload.discard()
            upload.closed = True  # closing it would complete the upload
            return
        upload.close()
        fs.rm(path)


# ---- the manifest -----------------------------------------------------------------------------------


def read_manifest(
    dirpath: str, storage_options: Mapping[str, Any] | None = None, check_bucket: bool = True
) -> dict[str, str]:
    """The manifest of checkpoint folder ``dirpath``: checkpoint name -> object key (relative to it).

    Without one, ``check_bucket`` (one more request) refuses a missing bucket with an ObjectStoreError.
    """
    url = join(dirpath, MANIFEST_NAME)
    with reaching(url):
        fs, path = filesystem(url, storage_options)
        try:
            raw = fs.cat_file(path)
        except FileNotFoundError:
            if check_bucket:
                _check_bucket(fs, path, dirpath)
            return {}
    try:
        manifest = json.loads(raw)
        names = manifest["names"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(names, dict):
            raise ValueError(f"not a {MANIFEST_FORMAT} manifest")
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointFormatError(f"{url}: not a checkpoint manifest ({error})") from None
    return {str(k): str(v) for k, v in names.items()}


def _check_bucket(fs: Any, path: str, url: str) -> None:
    """Refuse a folder whose bucket is missing (before training, not at the first save)."""
    bucket = path.split("/", 1)[0]
    fs.invalidate_cache(bucket)
    if not fs.exists(bucket):
        raise ObjectStoreError(
            f"{url}: the bucket {bucket!r} does not exist or these credentials cannot see it; "
            "create it, or point the URL (and the endpoint/credentials) at one that does"
        )


def write_manifest(
    dirpath: str, names: Mapping[str, str], storage_options: Mapping[str, Any] | None = None
) -> None:
    """Replace the manifest with one PUT (an object appears whole: readers see the old or the new one)."""
    body = json.dumps(
        {"format": MANIFEST_FORMAT, "version": 1, "names": dict(sorted(names.items()))}, indent=1
    )
    put_object(join(dirpath, MANIFEST_NAME), body.encode("utf-8"), storage_options)


def put_object(url: str, body: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write a small object with one PUT (it appears whole, or not at all)."""
    with reaching(url):
        fs, path = filesystem(url, storage_options)
        fs.pipe_file(path, body)


def new_state_key(first_name: str) -> str:
    """``states/<first name's stem>-<random>.safetensors``: a key nothing else was ever written under."""
    stem = first_name.removesuffix(".safetensors")
    return f"{STATES_FOLDER}/{stem}-{uuid.uuid4().hex[:12]}.safetensors"


def fresh_find(fs: Any, path: str, detail: bool = False) -> Any:
    """``fs.find(path)`` from the store itself, not fsspec's listing cache; empty when nothing is there."""
    fs.invalidate_cache(path)
    try:
        return fs.find(path, detail=detail)
    except FileNotFoundError:
        return {} if detail else []


def delete_unreferenced(
    dirpath: str, names: Mapping[str, str], storage_options: Mapping[str, Any] | None = None
) -> list[str]:
    """Delete the objects under ``dirpath/states/`` that no name in ``names`` points at; return their keys.

    A name pointing at a folder prefix keeps everything under it; an unnamed folder (a sharded upload
    a crashed run never named, or an evicted one) goes whole and is returned as one key.
    """
    url = join(dirpath, STATES_FOLDER)
    with reaching(url):
        fs, path = filesystem(url, storage_options)
        found = fresh_find(fs, path)
        kept = {key.removeprefix(f"{STATES_FOLDER}/") for key in names.values()}
        top = {p: p.removeprefix(path + "/").split("/", 1)[0] for p in found}
        gone = sorted(p for p in found if top[p] not in kept)
        if gone:
            fs.rm(gone)
    return sorted({f"{STATES_FOLDER}/{top[p]}" for p in gone})


def stored_bytes(dirpath: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """Bytes of the state objects of checkpoint folder ``dirpath`` (each stored once, whatever its names)."""
    url = join(dirpath, STATES_FOLDER)
    with reaching(url):
        fs, path = filesystem(url, storage_options)
        fs.invalidate_cache(path)
        return int(sum(fs.du(path, total=False).values())) if fs.exists(path) else 0


def resolve(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The URL of the object holding checkpoint ``url``: its folder's manifest entry if any, else itself."""
    parent, name = _split(url)
    key = read_manifest(parent, storage_options, check_bucket=False).get(name) if parent else None
    return join(parent, key) if key else url


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether checkpoint ``url`` is a manifest name, an object or a complete folder (with its index)."""
    target = resolve(url, storage_options)
    with reaching(target):
        fs, path = filesystem(target, storage_options)
        fs.invalidate_cache(path)
        return bool(fs.isfile(path) or fs.isfile(join(path, INDEX_NAME)))


# ---- reading ------------------------------------------------------------------------------------------


@functools.cache
def download_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="detector-objects-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


_copies: dict[tuple[str, str], Path] = {}


def local_copy(url: str, storage_options: Mapping[str, Any] | None = None) -> Path:
    """A local file (or folder, for a folder checkpoint) holding checkpoint ``url`` (resolved through its
    folder's manifest), downloaded once per object version into a temp folder removed at exit.

    Raises:
        CheckpointFormatError: naming ``url`` when there is no such checkpoint, or a folder without
            its index (an upload cut short).
        ObjectStoreError: when the store cannot be reached.
    """
    target = resolve(url, storage_options)
    with reaching(target):
        fs, path = filesystem(target, storage_options)
        fs.invalidate_cache(path)
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise CheckpointFormatError(f"{url}: no such checkpoint object") from None
        files = {path: info}
        if info.get("type") == "directory":  # one LIST: every object's version
            files = fresh_find(fs, path, detail=True)
            if join(path, INDEX_NAME) not in files:
                raise CheckpointFormatError(f"{target}: a folder without {INDEX_NAME}: not a checkpoint")
        version = json.dumps(sorted((p, _version(i)) for p, i in files.items()))
        cached = _copies.get((target, version))
        if cached is not None and cached.exists():
            return cached
        local = download_folder() / uuid.uuid4().hex / target.rsplit("/", 1)[-1]
        places = [local / p.removeprefix(path + "/") if p != path else local for p in files]
        for place in places:
            place.parent.mkdir(parents=True, exist_ok=True)
        fs.get(list(files), [str(place) for place in places])
    _copies[(target, version)] = local
    return local


def _version(info: Mapping[str, Any]) -> str:
    return str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("size"))


def named_by_url(error: Exception, copy: Path, url: str) -> Exception:
    """``error`` (of reading the local ``copy``) naming the checkpoint's ``url`` instead; for re-raising."""
    error.args = tuple(a.replace(str(copy), url) if isinstance(a, str) else a for a in error.args)
    if isinstance(error, CollectiveError):
        error.failures = [failure.replace(str(copy), url) for failure in error.failures]
    return error


def through_local_copy(function: Callable[..., _Result]) -> Callable[..., _Result]:
    """Let a reader of local checkpoint files take a URL (and ``storage_options=``): it reads a local
    copy; errors name the URL."""

    @functools.wraps(function)
    def wrapper(
        path: Any, *args: Any, storage_options: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> _Result:
        if not is_url(path):
            return function(local(path), *args, **kwargs)
        copy = local_copy(path, storage_options)
        try:
            return function(copy, *args, **kwargs)
        except (CheckpointFormatError, CollectiveError) as error:
            raise named_by_url(error, copy, resolve(path, storage_options)) from None

    return wrapper


def remove(url: str, storage_options: Mapping[str, Any] | None = None, recursive: bool = False) -> None:
    """Delete the object at ``url`` (``recursive``: every object under it too); a missing one is fine."""
    with reaching(url):
        fs, path = filesystem(url, storage_options)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=recursive)
