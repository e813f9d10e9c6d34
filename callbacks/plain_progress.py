"""Progress as plain lines (step, loss, rate, ETA) for logs that are not a terminal."""

from __future__ import annotations

import math
import sys
import time
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar
from typing_extensions import override


class PlainProgress(ProgressBar):
    """Print one line every ``every_n_steps`` optimizer steps and one per validation, on global rank zero.

    A progress bar redrawn with carriage returns turns into one unreadable line in a file; this writes
    ``step 40/300 | epoch 0 | train_loss 0.6812 | 3.21 steps/s | ETA 0:01:21`` instead. The CLI uses it
    in place of the bar when stdout is not a terminal (nohup, CI, a scheduler).

    Example::

        trainer:
          callbacks:
            - class_path: callbacks.plain_progress.PlainProgress
              init_args:
                every_n_steps: 50

    Args:
        every_n_steps: steps between lines; ``None`` uses ``trainer.log_every_n_steps``.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._start: tuple[float, int] | None = None  # (time, global step) when training started
        self._last_step = -1

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    def _emit(self, trainer: pl.Trainer, line: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(line, file=sys.stdout, flush=True)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = (time.perf_counter(), trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        every = self.every_n_steps or max(int(getattr(trainer, "log_every_n_steps", 50)), 1)
        if step == self._last_step or step % every != 0 or self._start is None:
            return
        self._last_step = step
        elapsed, done = time.perf_counter() - self._start[0], step - self._start[1]
        self._emit(trainer, self.step_line(trainer, elapsed, done))

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        values = " | ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
        self._emit(trainer, f"validation epoch {trainer.current_epoch} step {trainer.global_step} | {values}")

    @staticmethod
    def step_line(trainer: pl.Trainer, elapsed_s: float, steps_done: int) -> str:
        """``step S/T | epoch E | train_loss L | R steps/s | ETA H:MM:SS`` (``?`` where unknown)."""
        step = trainer.global_step
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        loss = trainer.progress_bar_metrics.get("train_loss_step", trainer.callback_metrics.get("train_loss"))
        rate = steps_done / elapsed_s if elapsed_s > 0 else 0.0
        finite_total = total is not None and math.isfinite(float(total))
        eta = "?"
        if finite_total and rate > 0:
            eta = str(timedelta(seconds=round(max(int(total) - step, 0) / rate)))
        parts = [
            f"step {step}/{int(total) if finite_total else '?'}",
            f"epoch {trainer.current_epoch}",
            f"train_loss {float(loss):.4f}" if loss is not None else "train_loss ?",
            f"{rate:.2f} steps/s",
            f"ETA {eta}",
        ]
        return " | ".join(parts)
