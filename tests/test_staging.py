"""Tests for CPU snapshots into reused staging buffers (asynchronous saves)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch

from detector.checkpoint import staging as staging_module
from detector.checkpoint.staging import StagingBuffers, storages, wait_for_copies
from tests.state_helpers import assert_identical


def _state() -> dict:
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {
        "state_dict": OrderedDict([("w", weight), ("b", torch.zeros(3, dtype=torch.bfloat16))]),
        "tied": weight,
        "opt": [{"step": torch.tensor(5.0), "exp_avg": weight.t()}],
        "rng": np.arange(4, dtype=np.uint32),
        "epoch": 2,
    }


def test_a_snapshot_equals_the_state_and_does_not_follow_later_changes() -> None:
    state, staging = _state(), StagingBuffers()
    snapshot = staging.snapshot(state).state
    assert_identical(snapshot, _state())
    assert snapshot["tied"] is snapshot["state_dict"]["w"]  # aliasing kept: one copy
    state["state_dict"]["w"].add_(1)
    state["rng"][0] = 99
    assert_identical(snapshot, _state())
    assert staging.nbytes == 12 * 4 + 3 * 2 + 4 + 12 * 4


def test_the_next_snapshot_reuses_the_buffers_and_holds_the_new_values() -> None:
    state, staging = _state(), StagingBuffers()
    first = staging.snapshot(state).state
    pointers = [first["state_dict"]["w"].data_ptr(), first["opt"][0]["exp_avg"].data_ptr()]
    state["state_dict"]["w"].mul_(2)
    state["opt"][0]["step"].add_(1)
    second = staging.snapshot(state).state
    assert [second["state_dict"]["w"].data_ptr(), second["opt"][0]["exp_avg"].data_ptr()] == pointers
    assert torch.equal(second["state_dict"]["w"], torch.arange(12.0).reshape(3, 4) * 2)
    assert torch.equal(second["opt"][0]["exp_avg"], second["state_dict"]["w"].t())
    assert second["opt"][0]["step"].item() == 6.0


def test_a_tensor_whose_shape_or_dtype_changed_gets_a_new_buffer() -> None:
    staging = StagingBuffers()
    first = staging.snapshot({"a": torch.ones(4), "b": torch.ones(2)}).state
    second = staging.snapshot({"a": torch.ones(5), "b": torch.ones(2, dtype=torch.float64)}).state
    assert second["a"].data_ptr() != first["a"].data_ptr() and second["a"].shape == (5,)
    assert second["b"].dtype == torch.float64
    staging.release()
    assert staging.nbytes == 0


def test_deferred_tensors_are_filled_by_copy_and_everything_else_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(staging_module, "DEFER_MIN_BYTES", 16)
    weight, buffer = torch.arange(8, dtype=torch.float32), torch.arange(8, dtype=torch.float32)
    state = {"w": weight, "view": weight[2:], "running_mean": buffer, "tiny": torch.ones(2)}
    snapshot = StagingBuffers().snapshot(state, defer=storages([weight, state["tiny"]]))
    assert snapshot.deferred_bytes == 8 * 4 + 6 * 4  # "w" and its view; "tiny" is under the size
    assert wait_for_copies_would_block()
    buffer.add_(100)  # a buffer the forward changes: its value at the snapshot was taken at once
    state["tiny"].add_(100)
    weight.mul_(-1)  # changed before the copy: the copy sees it (the fence exists to prevent this)
    snapshot.copy()
    assert snapshot.deferred_bytes == 0 and not wait_for_copies_would_block()
    assert torch.equal(snapshot.state["running_mean"], torch.arange(8.0))
    assert torch.equal(snapshot.state["tiny"], torch.ones(2))
    assert torch.equal(snapshot.state["w"], -torch.arange(8.0))
    assert torch.equal(snapshot.state["view"], -torch.arange(2.0, 8.0))


def test_the_fence_waits_for_a_copy_running_in_another_thread() -> None:
    source = torch.ones(1 << 16)
    snapshot = StagingBuffers().snapshot({"w": source}, defer=storages([source]))
    started = threading.Event()
    original = snapshot.copy

    def slow_copy() -> None:
        started.set()
        time.sleep(0.3)
        original()

    thread = threading.Thread(target=slow_copy)
    thread.start()
    started.wait()
    waited = wait_for_copies()
    assert waited >= 0.2 and torch.equal(snapshot.state["w"], source)
    thread.join()
    assert wait_for_copies() == 0.0


def test_a_failed_copy_still_opens_the_fence() -> None:
    source = torch.ones(1 << 16)
    snapshot = StagingBuffers().snapshot({"w": source}, defer=storages([source]))
    snapshot._copies[0] = (torch.empty(3), source)  # a buffer the copy cannot fill
    with pytest.raises(RuntimeError):
        snapshot.copy()
    assert not wait_for_copies_would_block()


def wait_for_copies_would_block() -> bool:
    return bool(staging_module._pending)
