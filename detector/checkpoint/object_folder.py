"""A checkpoint folder on object storage: what the checkpoint callback does there instead of links, renames.

Policy lives in :mod:`detector.checkpoint.topk`; this class only maps its names onto objects through the
manifest of :mod:`detector.checkpoint.objects`. Every save costs: one multipart upload of the state
(``ceil(size / PART_BYTES)`` part requests + 2), one PUT of the manifest (a few hundred bytes), one
LIST of ``states/`` and one DELETE per object no name points at any more. A state is stored once
however many names it has. A sharded checkpoint's target is a key prefix instead (W shard objects,
the state object, ``index.json``), kept and deleted whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from detector.checkpoint.objects import (
    delete_unreferenced,
    join,
    new_state_key,
    read_manifest,
    write_manifest,
)


class ObjectCheckpointFolder:
    """The checkpoint names of one run in ``dirpath`` (a URL), kept in its manifest.

    Args:
        dirpath: the folder URL (``s3://bucket/prefix``).
        storage_options: passed to fsspec (endpoint, credentials, ...); ``None``: the environment's.
    """

    def __init__(self, dirpath: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.dirpath = dirpath.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self._names: dict[str, str] = {}

    def open(self) -> list[str]:
        """Read the manifest and delete state objects it does not name (uploads a killed run finished
        but never named); return their keys."""
        self._names = read_manifest(self.dirpath, self.storage_options)
        return delete_unreferenced(self.dirpath, self._names, self.storage_options)

    def names(self) -> list[str]:
        """The committed checkpoint names, sorted."""
        return sorted(self._names)

    def url(self, name: str) -> str:
        """The URL a reader gives for checkpoint ``name`` (resolved through the manifest on reading)."""
        return join(self.dirpath, name)

    def new_target(self, first_name: str) -> str:
        """A fresh object URL for a state about to be uploaded."""
        return join(self.dirpath, new_state_key(first_name))

    def publish(self, target: str, names: Iterable[str], deletions: Iterable[str]) -> None:
        """After ``target`` is uploaded: point ``names`` at it and drop ``deletions`` in one manifest
        write, then delete the objects no name points at any more."""
        key = target.removeprefix(self.dirpath + "/")
        updated = dict(self._names)
        updated.update(dict.fromkeys(names, key))
        for name in deletions:
            updated.pop(name, None)
        write_manifest(self.dirpath, updated, self.storage_options)
        self._names = updated
        delete_unreferenced(self.dirpath, updated, self.storage_options)

    def remove(self, names: Iterable[str]) -> None:
        """Drop ``names`` from the manifest, then delete the objects left unnamed."""
        dropped = [name for name in names if name in self._names]
        if not dropped:
            return
        updated = {k: v for k, v in self._names.items() if k not in dropped}
        write_manifest(self.dirpath, updated, self.storage_options)
        self._names = updated
        delete_unreferenced(self.dirpath, updated, self.storage_options)
