"""Crash-safe file commits: temp file in the same folder, fsync, rename, fsync the folder.

The one home of every atomic write in the project: :func:`write_bytes` / :func:`write_text` (a small
file at once), :func:`open_for_write` (a streamed file), :func:`new_dir` (a folder that must not
exist yet, filled and then committed), :func:`replace_dir` / :func:`link_tree` (a folder that replaces
another), :func:`atomic_link`, :func:`remove_path`, and :func:`clean_stale_temps` for a crash's leftovers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

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


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder below ``folder`` (``folder`` included) to disk."""
    for dirpath, _, filenames in os.walk(folder):
        for filename in filenames:
            fsync_file(Path(dirpath, filename))
        fsync_dir(Path(dirpath))


def commit_file(tmp: Path, final: Path) -> None:
    """Make ``tmp`` durable and atomically move it onto ``final``.

    Fsyncs the file, ``os.replace``s it onto ``final`` (readers see the old file or the new one, never
    a mix), then fsyncs the folder so the rename itself survives a power loss.

    Raises:
        ValueError: if ``tmp`` and ``final`` are in different folders (the rename would not be atomic).
    """
    tmp, final = Path(tmp), Path(final)
    _require_same_folder(tmp, final, "file")
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, folder fsync); return ``path``.

    Readers see the old file or the new one, never a torn one; a failure leaves no temp file behind.
    """
    with open_for_write(path, "wb") as out:
        out.write(data)
    return Path(path)


def write_text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    """:func:`write_bytes` for ``text`` in ``encoding``."""
    return write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def open_for_write(path: Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file beside ``path`` for writing; commit it onto ``path`` when the block ends.

    For output written piece by piece (``detector score``). Only a block that ends without an
    exception commits; otherwise the temp file is removed and ``path`` is left as it was.
    """
    final = Path(path)
    tmp = temp_path_for(final)
    try:
        with tmp.open(mode, encoding=None if "b" in mode else encoding) as out:
            yield out
        commit_file(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def new_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh hidden temp folder beside ``final`` to fill; commit it as ``final`` when the block ends.

    Every file and folder inside is fsynced, then the folder is renamed onto ``final``, which must not
    exist (never overwritten, even by a writer racing this one), then the parent is fsynced. On an
    exception, or when ``final`` exists, the temp folder is removed.

    Raises:
        FileExistsError: ``final`` exists, before the block or by the time of the commit.
    """
    final = Path(final)
    if os.path.lexists(final):
        raise FileExistsError(errno.EEXIST, "already exists", str(final))
    tmp = temp_path_for(final)
    tmp.mkdir()
    try:
        yield tmp
        _commit_new_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit_new_dir(tmp: Path, final: Path) -> None:
    _require_same_folder(tmp, final, "folder")
    fsync_tree(tmp)
    if os.path.lexists(final):
        raise FileExistsError(errno.EEXIST, "appeared while it was written", str(final))
    try:
        os.rename(tmp, final)  # fails on a non-empty folder at `final`; a file there is checked above
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "appeared while it was written", str(final)) from err
        raise
    fsync_dir(final.parent)


def atomic_link(src: Path, final: Path) -> None:
    """Atomically make ``final`` name the same content as ``src``, without writing the data twice.

    Hard-links ``src`` to a temp name beside ``final`` and renames it onto ``final``; where hard links
    are not supported (another filesystem, FAT, ...), copies instead. ``final`` is never missing or torn.
    """
    src, final = Path(src), Path(final)
    tmp = temp_path_for(final)
    try:
        _link_or_copy(src, tmp)
        commit_file(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def replace_dir(tmp: Path, final: Path, discard: Callable[[Path], None] = shutil.rmtree) -> None:
    """Atomically put the finished folder ``tmp`` at ``final`` (same parent), replacing any folder there.

    ``tmp``'s entries and the parent are fsynced. An existing ``final`` is swapped out in one step
    (Linux ``renameat2(RENAME_EXCHANGE)``): readers see the old folder or the new one, never neither
    and never a mix; the old one, now under a hidden temp name, is then handed to ``discard``
    (deleted at once by default; a caller may delete it in the background). Where the exchange is
    unsupported, the old folder is renamed to a hidden temp name first, which leaves a moment with no
    ``final``.

    Raises:
        ValueError: if ``tmp`` and ``final`` are in different folders (the rename would not be atomic).
    """
    tmp, final = Path(tmp), Path(final)
    _require_same_folder(tmp, final, "folder")
    fsync_dir(tmp)
    if not final.exists():
        os.rename(tmp, final)
    elif _exchange(tmp, final):
        fsync_dir(final.parent)
        discard(tmp)
    else:
        old = temp_path_for(final)
        os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        discard(old)
    fsync_dir(final.parent)


def link_tree(src: Path, final: Path) -> None:
    """Atomically make folder ``final`` hold the same files as folder ``src``, as hard links (copies where
    links are refused), then :func:`replace_dir` it into place. Files must not change once committed."""
    src, final = Path(src), Path(final)
    tmp = temp_path_for(final)
    try:
        for path in sorted(src.rglob("*")):
            target = tmp / path.relative_to(src)
            if path.is_dir():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(path, target)
        for folder in sorted({p.parent for p in tmp.rglob("*")}, reverse=True):
            fsync_dir(folder)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_path(path: Path) -> None:
    """Delete a file or a whole folder; a folder is first renamed to a hidden temp name (one atomic step,
    so a crash never leaves a half-deleted folder under its real name). A missing path is fine."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        doomed = temp_path_for(path)
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return
        fsync_dir(path.parent)
        shutil.rmtree(doomed)
        return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _require_same_folder(tmp: Path, final: Path, kind: str) -> None:
    if tmp.parent.resolve() != final.parent.resolve():
        raise ValueError(f"temp {kind} {tmp} must be in the folder of {final} for an atomic rename")


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` as ``dst``; copy where the filesystem refuses hard links."""
    try:
        os.link(src, dst)
    except OSError as err:
        if err.errno not in _NO_LINK_ERRNOS:
            raise
        shutil.copyfile(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    rename_exchange, at_fdcwd = 2, -100
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


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
