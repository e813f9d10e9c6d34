"""Helpers for tests/test_multi_device.py: a 2-process `python -m detector fit` on CPU, and its outputs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

REPO = Path(__file__).resolve().parents[1]
TINY = '{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}'


class RankSkewedRNG(Callback):
    """Draws ``global_rank + 1`` numbers at the start of a fresh fit, so every rank's RNG differs.

    Lightning seeds every rank alike; with this, a resume that handed a rank another rank's RNG
    state would change the dropout masks and show in the weights.
    """

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is None:
            torch.rand(trainer.global_rank + 1)


def cli_fit(cwd: Path, data: dict[str, Path], config: str, *extra: str) -> str:
    """Run a 2-process ``fit`` in ``cwd`` (created) with the tiny model; returns stdout + stderr."""
    args = [
        sys.executable, "-m", "detector", "fit",
        "--config", str(REPO / "configs/default.yaml"), "--config", str(REPO / config),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_epochs", "2",
        "--trainer.deterministic", "true", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=tests.multi_device_helpers.RankSkewedRNG",
        "--model.arch", TINY, "--data.batch_size", "8",
        "--data.train_path", str(data["train"]), "--data.val_path", str(data["val"]),
        "--data.tokenizer_root", str(cwd.parent / "tokenizer"), "--data.tokenizer_vocab_size", "200",
        *extra,
    ]  # fmt: skip
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONFAULTHANDLER"] = "1"  # a rank that dies of a signal prints its Python stacks
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    if done.returncode:
        fatal = output.find("Fatal Python error")  # the crashed rank's stacks, wherever they fell
        stacks = output[fatal : fatal + 6000] if fatal >= 0 else ""
        raise AssertionError(f"fit failed ({done.returncode}):\n{output[-6000:]}\n{stacks}")
    return output


def metric_rows(cwd: Path, version: int = 0) -> list[dict[str, str]]:
    """The rows of the run's CSV log (``logs/version_{version}``)."""
    with open(cwd / f"outputs/logs/version_{version}/metrics.csv") as handle:
        return list(csv.DictReader(handle))


def tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested state, by dotted path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = (
        state.items()
        if isinstance(state, dict)
        else enumerate(state)
        if isinstance(state, list | tuple)
        else []
    )
    found: dict[str, torch.Tensor] = {}
    for key, value in items:
        found |= tensors(value, f"{prefix}.{key}" if prefix else str(key))
    return found
