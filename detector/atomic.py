"""Crash-safe file commits: temp file in the same folder, fsync, rename, fsync the folder."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from pathlib import Path

TEMP_MARKER = ".tmp-"

# Hard links are refused with these on filesystems that lack them or across devices; we copy instead.
_NO_LINK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


def temp_path_for(final: Path) -> Path:
    """A fresh temporary path beside ``final``: ``.{name}.tmp-{pid}-{random}`` in the same folder.

    Same folder, so the final ``os.replace`` is a rename within one filesystem (atomic), and a crashed
    run's leftovers are found by :func:`clean_stale_temps`.
    """
    final = Path(final)
    return final.with_name(f".{final.name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (renames, links, deletions) to disk."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(tmp: Path, final: Path) -> None:
    """Make ``tmp`` durable and atomically move it onto ``final``.

    Fsyncs the file, ``os.replace``s it onto ``final`` (readers see the old file or the new one, never
    a mix), then fsyncs the folder so the rename itself survives a power loss.

    Raises:
        ValueError: if ``tmp`` and ``final`` are in different folders (the rename would not be atomic).
    """
    tmp, final = Path(tmp), Path(final)
    if tmp.parent.resolve() != final.parent.resolve():
        raise ValueError(f"temp file {tmp} must be in the folder of {final} for an atomic rename")
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def atomic_link(src: Path, final: Path) -> None:
    """Atomically make ``final`` name the same content as ``src``, without writing the data twice.

    Hard-links ``src`` to a temp name beside ``final`` and renames it onto ``final``; where hard links
    are not supported (another filesystem, FAT, ...), copies instead. ``final`` is never missing or torn.
    """
    src, final = Path(src), Path(final)
    tmp = temp_path_for(final)
    try:
        try:
            os.link(src, tmp)
        except OSError as err:
            if err.errno not in _NO_LINK_ERRNOS:
                raise
            shutil.copyfile(src, tmp)
        commit_file(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def clean_stale_temps(folder: Path) -> list[Path]:
    """Remove the temp files and folders a crashed run left in ``folder``; return what was removed.

    Temps are the hidden names that carry ``TEMP_MARKER`` (as :func:`temp_path_for` makes them).
    Call it when no other process is writing into ``folder`` (at the start of a run, on rank zero).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        if not (entry.name.startswith(".") and TEMP_MARKER in entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
    if removed:
        fsync_dir(folder)
    return removed
