"""Tests for the one-at-a-time background job runner."""

import os
import threading

import pytest

from detector.checkpoint.background import BACKGROUND_NICENESS, BackgroundWriteError, SerialJobs


def test_inline_mode_runs_the_job_before_returning() -> None:
    done = []
    SerialJobs(background=False).submit(lambda: done.append(1), label="a")
    assert done == [1]


def test_background_jobs_run_one_at_a_time_in_submission_order() -> None:
    jobs, order = SerialJobs(background=True), []
    release = threading.Event()

    def first() -> None:
        release.wait(timeout=10)
        order.append("first")

    jobs.submit(first, label="first")
    assert jobs.busy
    release.set()
    jobs.submit(lambda: order.append("second"), label="second")  # waits for the first
    jobs.wait()
    assert order == ["first", "second"]
    assert not jobs.busy


def test_a_failed_background_job_surfaces_once_at_the_next_call() -> None:
    jobs = SerialJobs(background=True)

    def fail() -> None:
        raise OSError(28, "No space left on device")

    jobs.submit(fail, label="checkpoint_latest.safetensors")
    with pytest.raises(BackgroundWriteError, match=r"failed: checkpoint_latest\.safetensors") as error:
        jobs.submit(lambda: None, label="next")
    assert isinstance(error.value.__cause__, OSError)
    jobs.wait()  # reported once


def test_a_background_job_runs_at_a_lower_cpu_priority_than_the_caller() -> None:
    jobs, seen = SerialJobs(background=True), []
    jobs.submit(lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())), label="a")
    jobs.wait()
    caller = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen == [min(19, caller + BACKGROUND_NICENESS)]


def test_the_first_part_runs_at_the_callers_priority_then_the_job_lower() -> None:
    jobs, seen = SerialJobs(background=True), []

    def priority() -> None:
        seen.append((os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), os.sched_getscheduler(0)))

    jobs.submit(priority, label="write", first=priority)
    jobs.wait()
    caller = (os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), os.sched_getscheduler(0))
    # Niceness, not SCHED_IDLE (an idle-class write starves behind any other niceness-19 job).
    assert seen == [caller, (min(19, caller[0] + BACKGROUND_NICENESS), caller[1])]


def test_a_job_started_at_niceness_19_runs_under_sched_idle() -> None:
    seen: list[tuple[int, int]] = []

    def start() -> None:  # a thread of a process already at niceness 19 cannot go lower
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        jobs = SerialJobs(background=True)
        jobs.submit(
            lambda: seen.append(
                (os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), os.sched_getscheduler(0))
            ),
            label="write",
        )
        jobs.wait()

    starter = threading.Thread(target=start)
    starter.start()
    starter.join()
    assert seen == [(19, os.SCHED_IDLE)]


@pytest.mark.parametrize("background", [False, True])
def test_a_failing_first_part_skips_the_job_and_surfaces(background: bool) -> None:
    jobs, ran = SerialJobs(background=background), []

    def fail() -> None:
        raise OSError("copy failed")

    if background:
        jobs.submit(lambda: ran.append("job"), label="latest", first=fail)
        with pytest.raises(BackgroundWriteError, match="failed: latest"):
            jobs.wait()
    else:
        with pytest.raises(OSError, match="copy failed"):
            jobs.submit(lambda: ran.append("job"), label="latest", first=fail)
    assert ran == []
