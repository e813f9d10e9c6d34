"""Tests for turning a first Ctrl-C into the SIGTERM path."""

import os
import signal
import time
from collections.abc import Iterator

import pytest

from detector.checkpoint.interrupt import GracefulSigint


@pytest.fixture
def sigterm_calls() -> Iterator[list[int]]:
    calls: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGTERM, previous)


def _deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.01)  # Python runs the handler at the next bytecode boundary


def test_first_ctrl_c_calls_the_sigterm_handler_and_second_interrupts(sigterm_calls: list[int]) -> None:
    # Python's own handler, whatever the suite inherited (a job started with `&` ignores SIGINT).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sigint = GracefulSigint()
        sigint.install()
        assert sigint.installed
        _deliver(signal.SIGINT)
        assert sigterm_calls == [signal.SIGTERM]
        assert not sigint.installed
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):
            _deliver(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_not_installed_without_a_python_sigterm_handler() -> None:
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        sigint = GracefulSigint()
        sigint.install()
        assert not sigint.installed
    finally:
        signal.signal(signal.SIGTERM, previous)
