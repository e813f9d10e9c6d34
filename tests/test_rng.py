"""Tests for detector.checkpoint.rng: capture, draw, restore, draw again: the same numbers; via a file."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.checkpoint.format import load_state, save_state
from detector.checkpoint.rng import capture_rng_state, restore_rng_state


def _draw() -> tuple[list[float], list[float], torch.Tensor, torch.Tensor | None]:
    cuda = torch.rand(4, device="cuda").cpu() if torch.cuda.is_available() else None
    dropout = torch.nn.functional.dropout(torch.ones(16), p=0.5, training=True)
    return [random.random() for _ in range(4)], np.random.standard_normal(4).tolist(), dropout, cuda


def _assert_same_draws(first: tuple, second: tuple) -> None:
    assert first[0] == second[0]
    assert first[1] == second[1]
    assert torch.equal(first[2], second[2])
    assert (first[3] is None and second[3] is None) or torch.equal(first[3], second[3])


def test_restore_replays_every_generator() -> None:
    np.random.standard_normal()  # leave a cached Gaussian in NumPy's state too
    state = capture_rng_state()
    first = _draw()
    restore_rng_state(state)
    _assert_same_draws(_draw(), first)


def test_captured_state_round_trips_through_a_checkpoint_file(tmp_path: Path) -> None:
    state = capture_rng_state()
    first = _draw()
    _draw()  # move on, then come back from the file
    save_state({"rng": state}, tmp_path / "rng.safetensors")
    restore_rng_state(load_state(tmp_path / "rng.safetensors")["rng"])
    _assert_same_draws(_draw(), first)


def test_capture_copies_the_torch_state() -> None:
    state = capture_rng_state()
    before = state["torch"].clone()
    torch.rand(8)
    assert torch.equal(state["torch"], before)
    assert len(state["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_restore_rejects_an_incomplete_state() -> None:
    state = capture_rng_state()
    del state["numpy"]
    with pytest.raises(ValueError, match=r"RNG state lacks \['numpy'\]"):
        restore_rng_state(state)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_restore_warns_when_cuda_states_cannot_be_placed() -> None:
    state = capture_rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    with pytest.warns(UserWarning, match="RNG states for 1 CUDA devices, this process sees 0"):
        restore_rng_state(state)
