"""Capture and restore the random number generators a training step draws from, in a storable form."""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """The state of Python's, NumPy's, torch's CPU and every visible CUDA device's global generator.

    Returns:
        ``{"python": random.getstate(), "numpy": np.random.get_state(), "torch": ByteTensor,
        "cuda": [ByteTensor per device]}`` (``cuda`` is empty without CUDA); every value is one that
        :func:`detector.checkpoint.format.save_state` stores exactly.
    """
    cuda = [state.clone() for state in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back generator states from :func:`capture_rng_state`.

    CUDA states are restored for the devices present; when their number differs from the saved
    one (a resume on other hardware), a warning says so, since dropout will not replay exactly.

    Raises:
        ValueError: if ``state`` lacks one of the keys :func:`capture_rng_state` writes.
    """
    missing = {"python", "numpy", "torch", "cuda"} - set(state)
    if missing:
        raise ValueError(f"RNG state lacks {sorted(missing)}; expected the dict from capture_rng_state()")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(state["cuda"]) != devices:
        warnings.warn(
            f"checkpoint holds RNG states for {len(state['cuda'])} CUDA devices, this process sees {devices};"
            " restoring the common ones",
            stacklevel=2,
        )
    for index, cuda_state in enumerate(state["cuda"][:devices]):
        torch.cuda.set_rng_state(cuda_state.cpu(), index)
