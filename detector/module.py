"""DetectorModule: the DeBERTa sequence classifier (human = 0, machine = 1) as a LightningModule."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch.distributed.fsdp import FSDPModule, fully_shard
from transformers import get_linear_schedule_with_warmup

from detector.backbone import build_classifier
from detector.checkpoint.compat import apply_pending_loader_states, attached_trainer
from detector.checkpoint.plugin import SafetensorsLoadingMixin
from detector.metrics import classification_metrics
from detector.scoring import prob_machine

# Lightning accumulates an on_epoch metric in its loop's results, which no checkpoint holds: the
# running sum of `train_loss` is carried across a mid-epoch resume under this checkpoint key.
TRAIN_LOSS_CARRY = "train_loss_epoch_running"
_TRAIN_LOSS_RESULT = "training_step.train_loss"
NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias", "layer_norm.weight", "layer_norm.bias")


class DetectorModule(SafetensorsLoadingMixin, LightningModule):  # type: ignore[misc]
    """Fine-tunes ``DebertaV2ForSequenceClassification`` to flag machine-written text.

    Args:
        pretrained: hub id (``microsoft/deberta-v3-base``) or local Hugging Face folder to load weights
            from; ``None`` builds the backbone from ``arch`` with random weights (the offline default).
        arch: overrides of the small DeBERTa-v3-shaped architecture (``detector.backbone.SMALL_ARCH``).
        vocab_size: vocabulary size for a config-built backbone (the CLI links it from the tokenizer).
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay; biases and LayerNorm weights get none.
        warmup_ratio: share of the optimizer steps spent warming up linearly, then linear decay to 0.
        betas: AdamW's coefficients of the running averages of the gradient and its square.
        eps: AdamW's term added to the denominator for numerical stability.
        layer_decay: layer-wise learning-rate decay: the classifier head and pooler train at
            ``learning_rate``, encoder layer ``i`` (of ``N``) at ``learning_rate * layer_decay ** (N - i)``
            and the embeddings at ``learning_rate * layer_decay ** (N + 1)``; 1.0 trains all alike.
        freeze_embeddings: keep the backbone's embeddings fixed (no gradient, no optimizer state): for
            a pretrained backbone on a CPU budget, the largest block of weights and the least to gain.
    """

    loss_weight: torch.Tensor

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
        layer_decay: float = 1.0,
        freeze_embeddings: bool = False,
    ) -> None:
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        self.save_hyperparameters()
        self.model = build_classifier(pretrained, vocab_size, arch=arch)
        if freeze_embeddings:
            self.model.base_model.embeddings.requires_grad_(False)
        self.val_metrics = classification_metrics("val_")
        self.test_metrics = classification_metrics("test_")
        self.register_buffer("loss_weight", torch.ones(2), persistent=False)
        self._val_scores: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []
        self._val_index: list[torch.Tensor] = []
        self._last_val: tuple[torch.Tensor, torch.Tensor] | None = None
        self._loss_carry: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        trainer = attached_trainer(self)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
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
        base: Any = self.model.base_model
        layers = base.encoder.layer
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
        scores = prob_machine(logits)
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
        self._val_scores, self._val_labels, self._val_index = [], [], []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        scores = self._evaluate(batch, "val")
        self._val_scores.append(scores.detach().cpu())
        self._val_labels.append(batch["labels"].detach().cpu())
        if "index" in batch:
            self._val_index.append(batch["index"].detach().cpu())

    def on_validation_epoch_end(self) -> None:
        # Logged as Metric objects: Lightning computes them (torchmetrics gathers every rank's state)
        # and resets them at epoch end.
        self.log_dict(self.val_metrics, prog_bar=True)
        self._last_val = self._gather_val_scores()

    def _gather_val_scores(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        # A collective under DDP/FSDP2 (every rank runs this hook): each rank scored its own share.
        if not self._val_scores:
            local = None
        else:
            index = torch.cat(self._val_index) if self._val_index else None
            local = (torch.cat(self._val_scores), torch.cat(self._val_labels), index)
        shares = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            shares = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(shares, local)
        present = [share for share in shares if share is not None]
        if not present:
            return None
        scores, labels = torch.cat([s[0] for s in present]), torch.cat([s[1] for s in present])
        if all(s[2] is not None for s in present):
            # The sampler pads every rank's share to the same length by wrapping around: count each
            # validation row once, in row order.
            index = torch.cat([s[2] for s in present if s[2] is not None])
            _, first = _first_occurrences(index)
            scores, labels = scores[first], labels[first]
        return scores, labels

    def last_val_scores(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """P(machine) and labels of the last validation epoch over the whole validation set.

        Gathered across ranks at the end of the validation epoch (each row once), so the decision
        threshold chosen from them is the one of the whole set, whatever the number of devices.
        """
        return self._last_val

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        scores = prob_machine(self(batch["input_ids"], batch["attention_mask"]))
        return {"index": batch["index"], "prob_machine": scores}

    def _depth(self, name: str, num_layers: int) -> int:
        """0 for the embeddings, ``i + 1`` for encoder layer ``i``, ``num_layers + 1`` for pooler and head."""
        base = f"model.{self.model.base_model_prefix}."
        if not name.startswith(base) or ".pooler." in name:
            return num_layers + 1
        match = re.search(r"\.encoder\.layer\.(\d+)\.", name)
        return int(match.group(1)) + 1 if match else 0

    def configure_optimizers(self) -> Any:
        h: Any = self.hparams
        base: Any = self.model.base_model
        num_layers = len(base.encoder.layer)
        # One group per (weight decay or not, depth); with layer_decay 1 every depth is the top one.
        groups: dict[tuple[bool, int], list[torch.nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if param.requires_grad:
                depth = self._depth(name, num_layers) if h.layer_decay < 1.0 else num_layers + 1
                no_decay = name.endswith(NO_DECAY) or param.ndim < 2
                groups.setdefault((no_decay, depth), []).append(param)
        optimizer = torch.optim.AdamW(
            [
                {
                    "params": params,
                    "weight_decay": 0.0 if no_decay else h.weight_decay,
                    "lr": h.learning_rate * h.layer_decay ** (num_layers + 1 - depth),
                }
                for (no_decay, depth), params in sorted(groups.items(), key=lambda item: item[0])
            ],
            lr=h.learning_rate,
            betas=tuple(h.betas),
            eps=h.eps,
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(h.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _first_occurrences(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of ``index`` (sorted) and the position of each one's first occurrence."""
    rows, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(len(index))
    first = torch.full((len(rows),), len(index), dtype=torch.long).scatter_reduce(
        0, inverse, positions, reduce="amin"
    )
    return rows, first
