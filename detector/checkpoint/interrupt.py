"""Turn a first Ctrl-C into a graceful stop through the SIGTERM handler; a second one interrupts at once."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class GracefulSigint:
    """While installed, SIGINT calls the current SIGTERM handler instead of raising KeyboardInterrupt.

    Lightning's SIGTERM handler stops training after the current batch (``SIGTERMException``), a
    point where the state is whole and can be saved; a ``KeyboardInterrupt`` can land mid optimizer
    step. The first Ctrl-C takes that path and uninstalls this handler, so a second one raises
    ``KeyboardInterrupt`` at once. Installs only in the main thread and only when a Python SIGTERM
    handler is set (otherwise forwarding would kill the process).
    """

    def __init__(self) -> None:
        self._previous: Any = None
        self.forwarded = False  # a Ctrl-C was turned into the graceful stop

    @property
    def installed(self) -> bool:
        """Whether the SIGINT handler is in place."""
        return self._previous is not None

    def install(self) -> None:
        """Take over SIGINT; does nothing where it cannot forward to a SIGTERM handler."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return
        if callable(signal.getsignal(signal.SIGTERM)):
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def uninstall(self) -> None:
        """Put the previous SIGINT handler back."""
        if self.installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.uninstall()
        self.forwarded = True
        log.warning("Ctrl-C: stopping after this batch and saving checkpoint_latest (Ctrl-C again: stop now)")
        handler = signal.getsignal(signal.SIGTERM)
        if callable(handler):
            handler(signal.SIGTERM, frame)
