"""Export versioned inference bundles during and at the end of training."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, cast

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from transformers import PreTrainedModel
from typing_extensions import override

from detector.atomic import clean_stale_temps
from detector.bundle.export import (
    ValidationScores,
    bundle_name,
    choose_threshold,
    existing_bundles,
    hf_state_dict,
    remove_bundle,
    validate_version,
)
from detector.bundle.onnx import require_onnx
from detector.bundle.thresholds import DEFAULT_TARGET_FPR
from detector.bundle.writer import BundleExistsError, write_bundle


class InferenceExportCallback(Callback):
    """Write Hugging Face-compatible bundles to ``dirpath``: ``model_v{version}_epoch{N}/`` when
    ``monitor`` improves (or every ``every_n_epochs`` epochs) and ``model_v{version}_final/`` when
    ``fit`` ends, keeping at most ``keep_last`` epoch bundles.

    Each bundle is written by :func:`detector.bundle.writer.write_bundle` (atomic, never overwritten): the
    EMA weights when a callback with ``averaged_state_dict()`` is present, else the module's; the
    threshold for ``target_fpr`` from the module's ``last_val_scores()`` (see
    :class:`detector.bundle.export.ValidationScores`), else 0.5 with the reason in the metadata. ``N`` is
    the 0-based ``trainer.current_epoch``; at most one bundle per epoch. A run refuses to start
    when bundles of ``version`` it did not write already exist: bump the version. At the start of
    ``fit``, global rank zero removes the hidden temp folders a killed export left in ``dirpath``
    (:func:`detector.atomic.clean_stale_temps`): do not export into ``dirpath`` from another process
    while a run starts.

    Example::

        trainer:
          callbacks:
            - class_path: callbacks.inference_export.InferenceExportCallback
              init_args:
                version: "1.1"
                keep_last: 2
                onnx: true
    """

    def __init__(
        self,
        dirpath: str | None = None,
        version: str = "1.0",
        monitor: str = "val_f1",
        mode: Literal["min", "max"] = "max",
        every_n_epochs: int | None = None,
        keep_last: int = 3,
        target_fpr: float = DEFAULT_TARGET_FPR,
        onnx: bool = False,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1 or None, got {every_n_epochs}")
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if not 0.0 <= target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
        # None: `<trainer.default_root_dir>/models/inference`, resolved in setup.
        self._dirpath_given = dirpath is not None
        if onnx:
            require_onnx()
        self.dirpath = Path(dirpath if dirpath is not None else "outputs/models/inference")
        self.version = validate_version(version)
        self.monitor, self.mode = monitor, mode
        self.every_n_epochs, self.keep_last = every_n_epochs, keep_last
        self.target_fpr, self.onnx = target_fpr, onnx
        self._best: float | None = None
        self._written: list[str] = []  # epoch bundles this run wrote and still keeps, oldest first

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=str(self.dirpath), version=self.version)

    @property
    def written(self) -> list[str]:
        """Names of the epoch bundles this run wrote and keeps, oldest first."""
        return list(self._written)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._dirpath_given:
            self.dirpath = Path(trainer.default_root_dir) / "models" / "inference"
        if stage != TrainerFn.FITTING or not trainer.is_global_zero:
            return
        for path in clean_stale_temps(self.dirpath):
            rank_zero_info(f"Removed a temporary bundle folder left by a killed export: {path}")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in setup: callback state is restored by now whatever the strategy.
        if not isinstance(getattr(pl_module, "model", None), PreTrainedModel):
            raise TypeError(f"{type(self).__name__} needs the Hugging Face classifier in `pl_module.model`")
        if getattr(getattr(trainer, "datamodule", None), "tokenizer", None) is None:
            raise TypeError(f"{type(self).__name__} needs a datamodule with a `tokenizer` attribute")
        conflicts = None
        if trainer.is_global_zero:
            conflicts = [n for n in existing_bundles(self.dirpath, self.version) if n not in self._written]
        conflicts = trainer.strategy.broadcast(conflicts, src=0)
        if conflicts:
            raise BundleExistsError(
                f"{self.dirpath} already holds bundles of version {self.version} that this run did not "
                f"write: {conflicts}. Bundles are never overwritten: bump `version` or move them."
            )

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        if self.every_n_epochs is not None:
            due = (epoch + 1) % self.every_n_epochs == 0
        else:
            due = self._improved(self._monitored(trainer))
        name = bundle_name(self.version, epoch)
        if not due or name in self._written:
            return
        self._export(trainer, pl_module, name)
        self._written.append(name)
        while len(self._written) > self.keep_last:
            oldest = self._written.pop(0)
            if trainer.is_global_zero:
                remove_bundle(self.dirpath / oldest)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._export(trainer, pl_module, bundle_name(self.version))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"best": self._best, "written": list(self._written), "version": self.version}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._best = state_dict["best"]
        # Epoch bundles of another version are not ours to prune.
        self._written = list(state_dict["written"]) if state_dict.get("version") == self.version else []

    def _monitored(self, trainer: pl.Trainer) -> float:
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise KeyError(
                f"`{self.monitor}` was not logged; logged: {sorted(metrics)}. "
                f"Did you call self.log({self.monitor!r}, ...)?"
            )
        return float(metrics[self.monitor])

    def _improved(self, score: float) -> bool:
        if math.isnan(score):
            return False
        better = self._best is None or (score > self._best if self.mode == "max" else score < self._best)
        if better:
            self._best = score
        return better

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> None:
        # Every rank gathers (a collective under FSDP2); only global rank zero writes.
        weights, source = self._weights(trainer, pl_module)
        scores = pl_module.last_val_scores() if isinstance(pl_module, ValidationScores) else None
        if not trainer.is_global_zero:
            return
        metadata = {**self._metadata(trainer, pl_module), "weights": source}
        metadata.update(choose_threshold(scores, self.target_fpr))
        model = cast(PreTrainedModel, pl_module.model)  # checked in on_train_start
        tokenizer = trainer.datamodule.tokenizer  # type: ignore[attr-defined]
        write_bundle(model, tokenizer, self.dirpath, name, metadata, weights=weights, onnx=self.onnx)

    @staticmethod
    def _weights(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[dict[str, Tensor], str]:
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        ema = next((cb for cb in callbacks if hasattr(cb, "averaged_state_dict")), None)
        if ema is not None:
            return hf_state_dict(ema.averaged_state_dict()), "ema"
        return hf_state_dict(pl_module.state_dict()), "trained"

    @staticmethod
    def _epoch_index(trainer: pl.Trainer) -> int:
        # 0-based index of the epoch being or last trained: after fit, `current_epoch` counts the
        # completed epochs, one past the last epoch's index.
        return max(trainer.fit_loop.epoch_progress.current.ready - 1, 0)

    def _metadata(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        datamodule = getattr(trainer, "datamodule", None)
        fingerprint = getattr(datamodule, "data_fingerprint", None)
        seed = os.environ.get("PL_GLOBAL_SEED")
        metadata = {
            "version": self.version,
            "epoch": self._epoch_index(trainer),
            "step": trainer.global_step,
            "metrics": {k: v for k, v in trainer.callback_metrics.items() if v.numel() == 1},
            "monitor": self.monitor,
            "checkpoint": None,  # exported live from the training state at `step`
            "resumed_from": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "seed": int(seed) if seed is not None else None,
            "config": {"model": dict(pl_module.hparams), "data": dict(getattr(datamodule, "hparams", {}))},
            "data_fingerprint": fingerprint() if callable(fingerprint) else None,
        }
        max_length = getattr(datamodule, "max_length", None)
        if max_length is not None:
            metadata["max_length"] = int(max_length)
        return metadata
