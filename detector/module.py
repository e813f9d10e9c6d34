"""DetectorModule: the DeBERTa sequence classifier (human = 0, machine = 1) as a LightningModule."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch.distributed.fsdp import FSDPModule, fully_shard
from transformers import get_linear_schedule_with_warmup

from detector.backbone import build_classifier
from detector.checkpoint.plugin import SafetensorsLoadingMixin
from detector.loader import apply_pending_loader_states
from detector.metrics import classification_metrics

# Lightning accumulates an on_epoch metric in its loop's results, which no checkpoint holds: the
# running sum of `train_loss` is carried across a mid-epoch resume under this checkpoint key.
TRAIN_LOSS_CARRY = "train_loss_epoch_running"
_TRAIN_LOSS_RESULT = "training_step.train_loss"
NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias", "layer_norm.weight", "layer_norm.bias")


class DetectorModule(SafetensorsLoadingMixin, LightningModule):  # type: ignore[misc]
    loss_weight: torch.Tensor

    """Fine-tunes ``DebertaV2ForSequenceClassification`` to flag machine-written text.

    Args:
        pretrained: hub id (``microsoft/deberta-v3-base``) or local Hugging Face folder to load weights
            from; ``None`` builds the backbone from ``arch`` with random weights (the offline default).
        arch: overrides of the small DeBERTa-v3-shaped architecture (``detector.backbone.SMALL_ARCH``).
        vocab_size: vocabulary size for a config-built backbone (the CLI links it from the tokenizer).
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay; biases and LayerNorm weights get none.
        warmup_ratio: share of the optimizer steps spent warming up linearly, then linear decay to 0.
        betas, eps: AdamW settings.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        arch: dict[str, Any] | None = None,
        vocab_size: int = 8000,
        learning_rate: float = 5e-4,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.save_hyperparameters()
        self.model = build_classifier(pretrained, vocab_size, arch=arch)
        self.val_metrics = classification_metrics("val_")
        self.test_metrics = classification_metrics("test_")
        self.register_buffer("loss_weight", torch.ones(2), persistent=False)
        self._val_scores: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []
        self._loss_carry: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        has_weights = hasattr(datamodule, "class_weights") and stage == "fit"
        weights = datamodule.class_weights() if has_weights else None  # type: ignore[union-attr]
        if weights is not None:
            self.loss_weight.copy_(weights)

    def on_train_start(self) -> None:
        # Here, not in a checkpoint callback: mid-epoch resume must not depend on which one is used.
        apply_pending_loader_states(self.trainer)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: FSDP2, each DeBERTa layer sharded, then the whole classifier."""
        mesh = self.device_mesh
        if mesh is None or isinstance(self.model, FSDPModule):
            return
        data_parallel = mesh["data_parallel"]
        layers: Any = self.model.deberta.encoder.layer  # type: ignore[union-attr]
        for layer in layers:
            fully_shard(layer, mesh=data_parallel)
        fully_shard(self.model, mesh=data_parallel)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, 2)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, weight=self.loss_weight)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        # sync_dist: the logged loss is the global batch's (mean over ranks), one scalar all-reduce a step.
        self.log(
            "train_loss",
            loss,
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=len(batch["labels"]),
        )
        if self._loss_carry is not None:
            self._apply_loss_carry(self._loss_carry)
            self._loss_carry = None
        return loss

    def _loss_result(self) -> Any:
        # Lightning's private per-epoch accumulator of `train_loss` (sum of loss * batch size, count).
        results = getattr(self.trainer.fit_loop.epoch_loop, "_results", None)
        return results.get(_TRAIN_LOSS_RESULT) if results is not None else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        result = self._loss_result() if self._trainer is not None else None
        if result is None or not hasattr(result, "cumulated_batch_size"):
            return
        running = torch.stack([result.value.detach().double(), result.cumulated_batch_size.double()])
        if self.trainer.world_size > 1:  # every rank saves (Lightning's contract); rank 0 restores the total
            running = self.trainer.strategy.reduce(running, reduce_op="sum")
        checkpoint[TRAIN_LOSS_CARRY] = {
            "epoch": self.current_epoch,
            "batches": self._batches_processed(),
            "sum": float(running[0]),
            "count": float(running[1]),
        }

    def _batches_processed(self) -> int:
        progress: Any = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return int(progress.processed)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._loss_carry = checkpoint.get(TRAIN_LOSS_CARRY)

    def _apply_loss_carry(self, carry: dict[str, Any]) -> None:
        """Add the interrupted epoch's running `train_loss` sum, when resuming at the saved position."""
        same_place = carry["epoch"] == self.current_epoch and carry["batches"] == self._batches_processed()
        result = self._loss_result()
        if not same_place or result is None or self.global_rank != 0:
            return
        result.value += torch.tensor(carry["sum"], dtype=result.value.dtype, device=result.value.device)
        result.cumulated_batch_size += int(carry["count"])

    def _evaluate(self, batch: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        scores = logits.float().softmax(-1)[:, 1]
        loss = self._loss(logits, batch["labels"])
        self.log(
            f"{prefix}_loss",
            loss,
            on_epoch=True,
            sync_dist=True,
            prog_bar=prefix == "val",
            batch_size=len(batch["labels"]),
        )
        metrics = self.val_metrics if prefix == "val" else self.test_metrics
        metrics.update(scores, batch["labels"])
        return scores

    def on_validation_epoch_start(self) -> None:
        self._val_scores, self._val_labels = [], []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        scores = self._evaluate(batch, "val")
        self._val_scores.append(scores.detach().cpu())
        self._val_labels.append(batch["labels"].detach().cpu())

    def on_validation_epoch_end(self) -> None:
        # Logged as Metric objects: Lightning computes them (torchmetrics gathers every rank's state)
        # and resets them at epoch end.
        self.log_dict(self.val_metrics, prog_bar=True)

    def last_val_scores(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """P(machine) and labels of the last validation epoch on this rank (for threshold choice)."""
        if not self._val_scores:
            return None
        return torch.cat(self._val_scores), torch.cat(self._val_labels)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        scores = self(batch["input_ids"], batch["attention_mask"]).float().softmax(-1)[:, 1]
        return {"index": batch["index"], "prob_machine": scores}

    def configure_optimizers(self) -> Any:
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if name.endswith(NO_DECAY) or param.ndim < 2 else decay).append(param)
        h: Any = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": h.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=h.learning_rate,
            betas=tuple(h.betas),
            eps=h.eps,
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(h.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
