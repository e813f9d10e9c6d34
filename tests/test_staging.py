"""Tests for CPU snapshots into reused staging buffers (asynchronous saves)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from detector.checkpoint.staging import StagingBuffers
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
    snapshot = staging.snapshot(state)
    assert_identical(snapshot, _state())
    assert snapshot["tied"] is snapshot["state_dict"]["w"]  # aliasing kept: one copy
    state["state_dict"]["w"].add_(1)
    state["rng"][0] = 99
    assert_identical(snapshot, _state())
    assert staging.nbytes == 12 * 4 + 3 * 2 + 4 + 12 * 4


def test_the_next_snapshot_reuses_the_buffers_and_holds_the_new_values() -> None:
    state, staging = _state(), StagingBuffers()
    first = staging.snapshot(state)
    pointers = [first["state_dict"]["w"].data_ptr(), first["opt"][0]["exp_avg"].data_ptr()]
    state["state_dict"]["w"].mul_(2)
    state["opt"][0]["step"].add_(1)
    second = staging.snapshot(state)
    assert [second["state_dict"]["w"].data_ptr(), second["opt"][0]["exp_avg"].data_ptr()] == pointers
    assert torch.equal(second["state_dict"]["w"], torch.arange(12.0).reshape(3, 4) * 2)
    assert torch.equal(second["opt"][0]["exp_avg"], second["state_dict"]["w"].t())
    assert second["opt"][0]["step"].item() == 6.0


def test_a_tensor_whose_shape_or_dtype_changed_gets_a_new_buffer() -> None:
    staging = StagingBuffers()
    first = staging.snapshot({"a": torch.ones(4), "b": torch.ones(2)})
    second = staging.snapshot({"a": torch.ones(5), "b": torch.ones(2, dtype=torch.float64)})
    assert second["a"].data_ptr() != first["a"].data_ptr() and second["a"].shape == (5,)
    assert second["b"].dtype == torch.float64
    staging.release()
    assert staging.nbytes == 0
