"""Replace a checkpoint without paying for the old one on the save's critical path.

Replacing ``latest`` costs more than writing a fresh name: while the new file is written, the old
one's cached pages crowd the page cache (the kernel reclaims them on the writer's path), and the
rename that drops the old file's last name frees its blocks before it returns (0.4-0.55 s for 2.2 GB
on the development machine). :func:`drop_cached_pages` drops the old file's cached pages first (only
clean pages go: their data is on disk, nothing is lost) and :func:`set_aside` gives the old file a
hidden second name before the rename, so the rename frees nothing; :func:`reclaim_later` deletes
that name in a background thread once the new file is committed and durable. A sharded folder
that a save replaced goes the same way: :func:`detector.atomic.replace_dir` swaps it out to a hidden
name and hands that to :func:`reclaim_later`, and each rank drops its old shard's cached pages
first. Until then the hidden name is visible in the folder (:func:`wait_reclaimed` waits for it;
the process waits for it at exit). A crash in between leaves it: a temp name
(:data:`detector.atomic.TEMP_MARKER`) that :func:`detector.atomic.clean_stale_temps` removes, as the
checkpoint callback does at every start.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import shutil
import threading
from pathlib import Path

from detector.atomic import temp_path_for
from detector.checkpoint.background import BACKGROUND_NICENESS, lower_priority

_queue: queue.Queue[Path] = queue.Queue()
_lock = threading.Lock()
_worker: threading.Thread | None = None


def drop_cached_pages(path: Path) -> None:
    """Ask the kernel to drop ``path``'s clean cached pages (a missing file or a refusal is fine)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def set_aside(path: Path) -> Path | None:
    """Before ``path`` is replaced: a hidden hard link to its current file, if the rename would free it.

    Returns the hidden name, for :func:`reclaim_later` after the commit, or ``None`` when there is
    nothing to set aside (no file, another name still links it, or hard links are refused).
    """
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_nlink != 1:
            return None
        hidden = temp_path_for(path)
        os.link(path, hidden)
    except OSError:
        return None
    return hidden


def reclaim_later(hidden: Path) -> None:
    """Delete ``hidden`` (a name :func:`set_aside` made, or a hidden folder a replace swapped out) in
    the background reclaim thread."""
    global _worker
    with _lock:
        if _worker is None or not _worker.is_alive():
            _worker = threading.Thread(target=_run, name="checkpoint-reclaim", daemon=True)
            _worker.start()
            atexit.register(wait_reclaimed)  # a normal exit leaves no hidden name behind
        _queue.put(hidden)


def wait_reclaimed() -> None:
    """Block until every name handed to :func:`reclaim_later` so far is deleted."""
    _queue.join()


def _run() -> None:
    lower_priority(BACKGROUND_NICENESS)  # freeing blocks may wait; training goes first
    while True:
        hidden = _queue.get()
        try:
            with contextlib.suppress(FileNotFoundError):
                if hidden.is_dir() and not hidden.is_symlink():
                    shutil.rmtree(hidden)
                else:
                    hidden.unlink()
        except OSError:
            pass  # a temp name: clean_stale_temps removes it at the next run's start
        finally:
            _queue.task_done()
