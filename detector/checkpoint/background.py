"""Run file jobs one at a time, inline or in a background thread, surfacing a failure at the next call."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable

# A background job runs this much nicer than the thread that started it, so the training threads keep
# the cores (at +10 its CPU weight is about a tenth of theirs). Not SCHED_IDLE in general: an idle-class
# thread runs only when nothing else on the machine is runnable, so any other job at niceness 19 (a
# test suite, a second run) starves the write, and the next save waits for it in full (measured: the
# async fit took 1.9x the sync one). SCHED_IDLE only where the thread is already at niceness 19 and
# cannot go lower: the write would otherwise take an equal share of the cores from training.
BACKGROUND_NICENESS = 10


def lower_priority(niceness: int) -> None:
    """Make the calling thread ``niceness`` nicer (Linux: per thread); a thread already at 19 goes to
    SCHED_IDLE instead; elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if current >= 19:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread
            return
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + niceness))


class BackgroundWriteError(RuntimeError):
    """A background checkpoint job failed; the original error is its ``__cause__``."""


class SerialJobs:
    """At most one job in flight: :meth:`submit` waits for the previous job before starting the next.

    With ``background=False`` a job runs inline, so callers need one code path for sync and async saves.
    A failed background job is raised (as :class:`BackgroundWriteError`) by the next :meth:`submit` or
    :meth:`wait`, once.
    """

    def __init__(self, background: bool) -> None:
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._label = ""

    def submit(self, job: Callable[[], None], label: str, first: Callable[[], None] | None = None) -> None:
        """Wait for the job in flight (raising its failure), then run ``first`` and ``job`` (named ``label``).

        In the background, ``first`` runs at the caller's CPU priority (the training loop may be
        waiting for it) and ``job`` at ``BACKGROUND_NICENESS`` lower.
        """
        self.wait()
        if not self.background:
            if first is not None:
                first()
            job()
            return
        self._label = label
        self._thread = threading.Thread(
            target=self._run, args=(job, first), name="checkpoint-writer", daemon=True
        )
        self._thread.start()

    def wait(self) -> None:
        """Block until no job is in flight; raise the failure of the last one if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise BackgroundWriteError(f"background checkpoint write failed: {self._label}") from error

    @property
    def busy(self) -> bool:
        """Whether a background job is still running."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self, job: Callable[[], None], first: Callable[[], None] | None) -> None:
        try:
            if first is not None:
                first()
            lower_priority(BACKGROUND_NICENESS)
            job()
        except BaseException as error:  # surfaced in the training thread by wait()
            self._error = error
