"""Export versioned inference bundles during and at the end of training."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Literal, cast

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from transformers import PreTrainedModel
from typing_extensions import override

from callbacks.ema import EMACallback
from detector.atomic import clean_stale_temps, fsync_dir
from detector.bundle.export import (
    LineagePlan,
    ValidationScores,
    bundle_at,
    bundle_name,
    choose_threshold,
    hf_state_dict,
    plan_lineage,
    remove_bundle,
    retire_final,
    validate_version,
)
from detector.bundle.onnx import require_onnx
from detector.bundle.quantize import (
    DEFAULT_MAX_AUROC_DROP,
    DEFAULT_MAX_DECISION_CHANGE,
    Int8Check,
    check_limits,
)
from detector.bundle.thresholds import DEFAULT_TARGET_FPR
from detector.bundle.writer import write_bundle
from detector.checkpoint.monitor import improves, monitored_metrics
from detector.checkpoint.objects import is_url
from detector.run_folder import refusal


class InferenceExportCallback(Callback):
    """Write Hugging Face-compatible bundles to ``dirpath``: ``model_v{version}_epoch{N}/`` when
    ``monitor`` improves (or every ``every_n_epochs`` epochs) and ``model_v{version}_final/`` when
    ``fit`` ends, keeping at most ``keep_last`` epoch bundles.

    Each bundle is written by :func:`detector.bundle.writer.write_bundle` (atomic, never overwritten): the
    EMA weights when an :class:`~callbacks.ema.EMACallback` is present, else the module's; the
    threshold for ``target_fpr`` from the module's ``last_val_scores()`` (see
    :class:`detector.bundle.export.ValidationScores`), else 0.5 with the reason in the metadata. ``N`` is
    the 0-based ``trainer.current_epoch``; at most one bundle per epoch.

    Each bundle's metadata names the run that wrote it (``run_id``, kept in this callback's checkpoint
    state, so a resumed or extended run keeps it) and its ``step``. Before training, a run sorts the
    bundles of ``version`` in ``dirpath`` (:func:`detector.bundle.export.plan_lineage`): another run's
    stop it with one line, nothing touched; its own bundles written after the step it resumes from (a
    kill before the checkpoint recording them) are removed and written again when due. At the end, the
    lineage's earlier final bundle (a run being extended) is kept as ``model_v{version}_final_step{S}``
    so the new final bundle takes the plain name; a re-run that ends where that one did writes none.
    At the start of ``fit``, global rank zero removes the hidden temp folders a killed export left in
    ``dirpath`` (:func:`detector.atomic.clean_stale_temps`): do not export into ``dirpath`` from another
    process while a run starts.

    ``dirpath`` may be an object-store URL (``s3://bucket/models``, any fsspec URL): each bundle is
    written in a local temp folder and uploaded with its ``SHA256SUMS`` marker last
    (:mod:`detector.bundle.remote`); a removal deletes the marker first, the final bundle's retirement
    is a server-side copy (marker last) then a removal, so a reader never sees half a bundle.

    Args:
        dirpath: folder (or object-store URL) that receives the bundles.
        version: semantic version ``X.Y`` or ``X.Y.Z`` in the bundle names; bump it for a new run.
        monitor: logged metric whose improvement triggers an epoch bundle.
        mode: ``max`` when a higher ``monitor`` is better, ``min`` when lower is.
        every_n_epochs: export every N epochs regardless of ``monitor``; ``None``: on improvement.
        keep_last: how many epoch bundles of this run to keep, oldest deleted first.
        target_fpr: false-positive rate on validation that the stored decision threshold aims at.
        onnx: also write a checked ``model.onnx`` into each bundle.
        quantize: also write ``model_int8.onnx`` (implies ``onnx``), checked against the float model
            on the datamodule's validation split with its own threshold
            (:func:`detector.bundle.quantize.add_int8`); past a limit the export, and so the run, stops
            with one line (``python -m detector export --quantize`` retries from a checkpoint).
        max_auroc_drop: ``quantize``: the largest AUROC drop of the int8 model allowed.
        max_decision_change: ``quantize``: the largest share of validation texts allowed to change
            decision (each model at its own threshold).

    Example::

        trainer:
          callbacks:
            - class_path: callbacks.inference_export.InferenceExportCallback
              init_args:
                version: "1.1"
                keep_last: 2
                onnx: true
                quantize: true  # model_int8.onnx, checked on the validation split
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
        quantize: bool = False,
        max_auroc_drop: float = DEFAULT_MAX_AUROC_DROP,
        max_decision_change: float = DEFAULT_MAX_DECISION_CHANGE,
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
        check_limits(max_auroc_drop, max_decision_change)
        self._dirpath_given = dirpath is not None
        if onnx or quantize:
            require_onnx()
        self.dirpath: str | Path = (
            str(dirpath).rstrip("/") if is_url(dirpath) else Path(dirpath or "outputs/models/inference")
        )
        self.version = validate_version(version)
        self.monitor, self.mode = monitor, mode
        self.every_n_epochs, self.keep_last = every_n_epochs, keep_last
        self.target_fpr, self.onnx = target_fpr, onnx
        self.quantize, self.max_auroc_drop, self.max_decision_change = (
            quantize,
            max_auroc_drop,
            max_decision_change,
        )
        self._best: float | None = None
        self._written: list[str] = []  # epoch bundles this run wrote and still keeps, oldest first
        self._run_id: str | None = None  # the lineage: kept across resumes in the checkpoint
        self._reconciled = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=str(self.dirpath), version=self.version)

    @property
    def run_id(self) -> str | None:
        """The id of the run (and of the runs resumed from its checkpoints) written into every bundle."""
        return self._run_id

    @property
    def written(self) -> list[str]:
        """Names of the epoch bundles this run wrote and keeps, oldest first."""
        return list(self._written)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._dirpath_given:
            self.dirpath = Path(trainer.default_root_dir) / "models" / "inference"
        if stage != TrainerFn.FITTING:
            return
        self._reconciled = False  # once per fit, after the state is restored
        if not trainer.is_global_zero or is_url(self.dirpath):  # an object store has no temp folders
            return
        for path in clean_stale_temps(Path(self.dirpath)):
            rank_zero_info(f"Removed a temporary bundle folder left by a killed export: {path}")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in setup: callback state is restored by now whatever the strategy.
        if not isinstance(getattr(pl_module, "model", None), PreTrainedModel):
            raise TypeError(f"{type(self).__name__} needs the Hugging Face classifier in `pl_module.model`")
        if getattr(getattr(trainer, "datamodule", None), "tokenizer", None) is None:
            raise TypeError(f"{type(self).__name__} needs a datamodule with a `tokenizer` attribute")
        self._reconcile(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        if self.every_n_epochs is not None:
            due = (epoch + 1) % self.every_n_epochs == 0
        else:
            due = self._improved(trainer)
        name = bundle_name(self.version, epoch)
        if not due or name in self._written:
            return
        self._export(trainer, pl_module, name)
        self._written.append(name)
        while len(self._written) > self.keep_last:
            oldest = self._written.pop(0)
            if trainer.is_global_zero:
                remove_bundle(bundle_at(self.dirpath, oldest))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._reconciled:  # a resume whose loop was already done skips on_train_start
            self._reconcile(trainer)
        there = None
        if trainer.is_global_zero:
            there, kept = retire_final(self.dirpath, self.version, str(self._run_id), trainer.global_step)
            if kept:
                self._fsync_dir()
                rank_zero_info(
                    f"The final bundle of the run this one extends is now {bundle_at(self.dirpath, kept)}"
                )
        if not trainer.strategy.broadcast(there, src=0):
            self._export(trainer, pl_module, bundle_name(self.version))

    @override
    def state_dict(self) -> dict[str, Any]:
        written = list(self._written)
        return {"best": self._best, "written": written, "version": self.version, "run_id": self._run_id}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._best = state_dict["best"]
        self._run_id = state_dict.get("run_id")
        # Epoch bundles of another version are not ours to prune.
        self._written = list(state_dict["written"]) if state_dict.get("version") == self.version else []

    def _reconcile(self, trainer: pl.Trainer) -> None:
        """Before training: take this run's id, refuse another run's bundles, settle the lineage's own."""
        self._reconciled = True
        self._run_id = trainer.strategy.broadcast(self._run_id or uuid.uuid4().hex[:16], src=0)
        plan = None
        if trainer.is_global_zero:
            plan = plan_lineage(self.dirpath, self.version, self._run_id, trainer.global_step, self._written)
            if not plan.foreign:
                self._apply(plan)
        foreign = trainer.strategy.broadcast(plan.foreign if plan else None, src=0)
        if foreign:
            ways = "bump `version`, move them away" if trainer.ckpt_path else None
            raise refusal(self.dirpath, f"bundles of version {self.version}", foreign, ways)

    def _apply(self, plan: LineagePlan) -> None:
        for name in plan.stale:
            remove_bundle(bundle_at(self.dirpath, name))
            rank_zero_info(f"Removed {bundle_at(self.dirpath, name)}: written after the resumed checkpoint")
        if plan.stale:
            self._fsync_dir()

    def _fsync_dir(self) -> None:
        if not is_url(self.dirpath):  # an object store's requests are durable once answered
            fsync_dir(Path(self.dirpath))

    def _improved(self, trainer: pl.Trainer) -> bool:
        # Rank zero's metric decides on every rank: the export gathers weights (a collective).
        score = monitored_metrics(trainer, self.monitor)[self.monitor]
        better = improves(score, self._best, self.mode)
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
        int8 = self._int8_check(trainer) if self.quantize else None
        write_bundle(
            model, tokenizer, self.dirpath, name, metadata, weights=weights, onnx=self.onnx, int8=int8
        )

    def _int8_check(self, trainer: pl.Trainer) -> Int8Check:
        records = getattr(getattr(trainer, "datamodule", None), "records", {}).get("val")
        if records is None:
            raise ValueError(
                f"{type(self).__name__}(quantize=True) checks the int8 model on the validation split: "
                "the datamodule needs a `records['val']` (texts and labels)"
            )
        return Int8Check(records.text, records.label, self.max_auroc_drop, self.max_decision_change)

    @staticmethod
    def _weights(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[dict[str, Tensor], str]:
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        ema = next((cb for cb in callbacks if isinstance(cb, EMACallback)), None)
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
            "run_id": self._run_id,
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
