"""Worker functions for tests/test_sharded_state.py, run in spawned gloo processes (importable by name)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

from detector.checkpoint.sharded import load_sharded_state, save_sharded_state, split_sharded


def toy_model() -> nn.Module:
    """Rows 5 and 3 split unevenly over 2 ranks; seeded, so every rank builds the same weights."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 3))


def sharded_toy(steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The toy model under FSDP2 on every rank, after ``steps`` AdamW steps on fixed data."""
    model = toy_model()
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for step in range(steps):
        model(torch.full((2, 3), float(step + 1))).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A Lightning-shaped checkpoint dict with sharded model and optimizer state and plain extras."""
    return {
        "state_dict": get_model_state_dict(model),
        "optimizer_states": [get_optimizer_state_dict(model, optimizer)],
        "global_step": 3,
        "rng": torch.arange(4, dtype=torch.uint8),
    }


def init(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def save_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """Train 3 steps under FSDP2 and save the sharded state to ``folder``."""
    init(rank, world_size, port)
    try:
        model, optimizer = sharded_toy(3)
        save_sharded_state(training_state(model, optimizer), Path(folder))
    finally:
        dist.destroy_process_group()


def load_worker(rank: int, world_size: int, port: int, folder: str, out: str) -> None:
    """Load ``folder`` into a fresh FSDP2 model on this mesh; rank 0 writes the gathered values to ``out``."""
    init(rank, world_size, port)
    try:
        model, optimizer = sharded_toy(1)  # other values, same shapes: all must be overwritten
        _, targets = split_sharded(training_state(model, optimizer))
        state = load_sharded_state(Path(folder), targets)
        full = {key: value.full_tensor() for key, value in targets.items()}
        same = all(state_value is targets[key] for key, state_value in split_sharded(state)[1].items())
        if rank == 0:
            from safetensors.torch import save_file

            save_file({**full, "extras_same_objects": torch.tensor(same)}, out)
    finally:
        dist.destroy_process_group()


def failing_save_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """Rank 1's disk fails while writing its shard; every rank writes the error it got to ``folder.rankN``."""
    from detector.checkpoint import sharded as sharded_state

    init(rank, world_size, port)
    try:
        model, optimizer = sharded_toy(0)
        if rank == 1:

            def disk_full(*args: object, **kwargs: object) -> None:
                raise OSError(28, "No space left on device")

            sharded_state.save_state = disk_full  # type: ignore[assignment]
        try:
            save_sharded_state(training_state(model, optimizer), Path(folder))
            message = "saved"
        except Exception as err:  # recorded for the test to check
            message = f"{type(err).__name__}: {err}"
        Path(f"{folder}.rank{rank}").write_text(message)
        # Rank 0 still cleans up after the agreed error when rank 1 is done, so rank 1 tore its gloo
        # group down alone; once, in a loaded CI run, it died there of SIGABRT ("terminate called
        # without an active exception"; not reproduced in 14 runs since). Both ranks now tear down together.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def url_save_worker(rank: int, world_size: int, port: int, url: str, mode: str = "ok") -> None:
    """Train 3 steps under FSDP2 and upload the sharded state under the prefix ``url``.

    ``mode``: ``"ok"``; ``"fail"``: rank 1's upload raises; ``"kill"``: rank 1 is SIGKILLed in its
    upload once rank 0's objects are complete. Every rank that returns writes what it got ("saved"
    or the error) to the file ``rankN`` in the local folder ``$RESULTS``.
    """
    import signal
    import time

    from detector.checkpoint import sharded as sharded_state
    from detector.checkpoint.objects import exists, join
    from detector.checkpoint.sharded import STATE_NAME, save_sharded_state_to_url

    init(rank, world_size, port)
    try:
        model, optimizer = sharded_toy(3)
        if rank == 1 and mode != "ok":

            def broken(*args: object, **kwargs: object) -> None:
                if mode == "fail":
                    raise OSError(104, "Connection reset by peer")
                for _ in range(600):  # rank 0 uploads its shard, then the state object
                    if exists(join(url, STATE_NAME)):
                        break
                    time.sleep(0.1)
                os.kill(os.getpid(), signal.SIGKILL)

            sharded_state.save_state_to_url = broken  # type: ignore[assignment]
        try:
            save_sharded_state_to_url(training_state(model, optimizer), url)
            message = "saved"
        except Exception as err:  # recorded for the test to check
            message = f"{type(err).__name__}: {err}"
        Path(os.environ["RESULTS"], f"rank{rank}").write_text(message)
    finally:
        dist.destroy_process_group()
