"""RunSummary: at the end of fit, a table in the log and ``summary.json`` with what the run produced."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from rich.console import Console
from typing_extensions import override

from callbacks.inference_export import InferenceExportCallback
from callbacks.safetensors_checkpoint import SafetensorsTopKCheckpoint
from detector.bundle.export import bundle_at, bundle_name
from detector.run_summary import (
    build_summary,
    checkpoint_section,
    next_step,
    summary_table,
    unique,
    write_summary,
)


class RunSummary(Callback):
    """Summarise a finished ``fit``: best metric and its checkpoint, the top K with scores, the bundles
    written, steps, epochs, wall time, time the loop spent saving, and disk used by checkpoints (hard
    links counted once). Printed as a Rich table and written atomically to ``path``, on global rank
    zero, after every other callback's ``on_fit_end`` (so the final bundle is in it).

    A run stopped by SIGTERM or Ctrl-C gets its summary too, with ``stopped`` naming the signal
    (``"finished"`` otherwise): :meth:`on_exception` records it, :meth:`write_stopped` writes it once
    the checkpoint callback has saved (the CLI calls it, then exits with ``128 + signal``).

    Reads the :class:`~callbacks.safetensors_checkpoint.SafetensorsTopKCheckpoint` and
    :class:`~callbacks.inference_export.InferenceExportCallback` in ``trainer.callbacks`` (either may
    be absent). Times are those of this process: a resumed run reports its own part.

    Args:
        path: the JSON file to write.
        print_table: also print the summary as a table in the log.

    Example::

        summary:
          path: outputs/summary.json
          print_table: true
    """

    def __init__(self, path: str | None = None, print_table: bool = True) -> None:
        if path is not None and (not isinstance(path, str) or not path):
            raise ValueError(f"path must be a file path, got {path!r}")
        # None: `<trainer.default_root_dir>/summary.json`, resolved in setup.
        self._path_given = path is not None
        self.path, self.print_table = Path(path if path is not None else "outputs/summary.json"), print_table
        self._start: float | None = None
        self.summary: dict[str, Any] | None = None
        self.stop_signal: signal.Signals | None = None  # the signal that interrupted fit, if any

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._path_given:
            self.path = Path(trainer.default_root_dir) / "summary.json"

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.stop_signal = signal.SIGINT
        elif isinstance(exception, SIGTERMException):
            callbacks = trainer.callbacks  # type: ignore[attr-defined]
            checkpoint = next((cb for cb in callbacks if isinstance(cb, SafetensorsTopKCheckpoint)), None)
            by_ctrl_c = checkpoint is not None and checkpoint.stopped_by_ctrl_c
            self.stop_signal = signal.SIGINT if by_ctrl_c else signal.SIGTERM

    def write_stopped(self, trainer: pl.Trainer) -> None:
        """Write the summary of a fit that :attr:`stop_signal` interrupted (after its checkpoint save)."""
        if self.stop_signal is None or self._start is None:
            return
        self.summary = self._build(trainer, time.perf_counter() - self._start, self.stop_signal.name)
        self._start = None
        if trainer.is_global_zero:
            write_summary(self.summary, self.path)
            rank_zero_info(f"Stopped by {self.stop_signal.name}; run summary written to {self.path}")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # teardown follows every callback's on_fit_end; it is skipped when fit raised.
        if stage != TrainerFn.FITTING or self._start is None or getattr(trainer, "fast_dev_run", False):
            return
        self.summary = self._build(trainer, time.perf_counter() - self._start)
        self._start = None
        if not trainer.is_global_zero:
            return
        write_summary(self.summary, self.path)
        if self.print_table:
            # The last thing on screen: the table (with where the summary is), then what to run next.
            console = Console()
            console.print(summary_table(self.summary, title=f"Run summary ({self.path})"))
            line = next_step(self.summary)
            if line is not None:
                console.print(line, soft_wrap=True, highlight=False)
        else:
            rank_zero_info(f"Run summary written to {self.path}")

    @staticmethod
    def _build(trainer: pl.Trainer, wall_time_s: float, stopped: str = "finished") -> dict[str, Any]:
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        checkpoint = next((cb for cb in callbacks if isinstance(cb, SafetensorsTopKCheckpoint)), None)
        export = next((cb for cb in callbacks if isinstance(cb, InferenceExportCallback)), None)
        section = save_time_s = saves = None
        if checkpoint is not None:
            section = checkpoint_section(
                checkpoint.tracker, checkpoint.dirpath, checkpoint.monitor, checkpoint.best_model_path
            )
            save_time_s, saves = checkpoint.save_time
        bundles: list[str] = []
        if export is not None:
            names = [*export.written, bundle_name(export.version)]
            bundles = unique(str(bundle_at(export.dirpath, name)) for name in names)
        ema = next((cb for cb in callbacks if hasattr(cb, "eval_with_ema_for")), None)
        csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        return build_summary(
            global_step=trainer.global_step,
            epochs=trainer.current_epoch,
            wall_time_s=wall_time_s,
            save_time_s=save_time_s,
            saves=saves,
            checkpoints=section,
            bundles=bundles,
            stopped=stopped,
            val_weights="ema" if ema is not None and "validate" in ema.eval_with_ema_for else "raw",
            metrics_csv=None if csv is None else str(Path(csv.log_dir) / "metrics.csv"),
        )
