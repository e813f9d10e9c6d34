"""Keep an exponential moving average of the weights; validate on it; checkpoint it beside the raw weights."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.distributed.tensor import DTensor
from typing_extensions import override

from detector.checkpoint.staging import wait_for_copies
from detector.ema import EMASchedule, ExponentialMovingAverage

EvalStage = Literal["validate", "test", "predict"]
_STAGES: tuple[str, ...] = ("validate", "test", "predict")


class EMACallback(Callback):
    """Exponential moving average (EMA) of the model's weights, validated, checkpointed and resumed.

    After each optimizer step chosen by the schedule (see ``detector.ema.EMASchedule``: decay, optional
    timm-style warm-up, every N steps, start after step or epoch S) the EMA folds the weights in with
    fused ``torch._foreach_lerp_``, in float32 whatever the training precision, optionally on the CPU.
    Non-floating-point buffers are copied. Until the first update the EMA *is* the training weights.

    Contract with checkpoints (the opposite of Lightning's ``EMAWeightAveraging``, which writes the EMA
    into ``state_dict`` and leaves it in the module after fit):

    - Validation (and test/predict if listed in ``eval_with_ema_for``) runs on the EMA weights, swapped
      in at ``on_validation_start`` and out at ``on_validation_end``: ``val_f1`` and the top-K ranking
      measure the EMA. ``python -m detector validate|test|predict`` adds its own stage (``--weights raw``
      removes it), so a command scores the weights that are ranked and shipped. Lightning runs
      ``Checkpoint`` callbacks' hooks after all others (its ``_reorder_callbacks``), so a checkpoint
      saved in their ``on_validation_end`` holds the raw weights and the EMA that earned the score.
    - A checkpoint's model ``state_dict`` is always the raw training weights, even when saved while the
      EMA is swapped in; the EMA tensors, update count and settings live in this callback's state.
    - Resume restores the raw weights for training and the EMA and its counter for averaging.
    - After fit the module holds the raw weights; ``averaged_state_dict()`` gives the EMA.
    - DDP: every rank keeps the same EMA (the weights are equal after each step); rank zero writes.
      FSDP2 / tensor parallel (``ModelParallelStrategy``): each rank averages its DTensor shard. With
      sharded checkpoints (``SafetensorsModelParallelStrategy(save_distributed_checkpoint=True)``)
      the state holds the shards as DTensors and every rank writes its own; otherwise the state and
      ``averaged_state_dict()`` gather full tensors into CPU memory (a collective: call on every
      rank). Loading takes full tensors (a sharded checkpoint's are assembled) and re-shards them.
      ``FSDPStrategy`` (FSDP1 flat parameters) and DeepSpeed are refused with a ValueError.

    Why not a subclass of Lightning's ``WeightAveraging``: it deep-copies the whole LightningModule into
    an ``AveragedModel`` in the module's dtype, cannot shard, and its checkpoint/after-fit behaviour is
    the contract above reversed, so every hook would be overridden. Only its timing is kept: update in
    ``on_train_batch_end`` once per optimizer step (guarded for gradient accumulation).

    Example YAML::

        trainer:
          callbacks:
            - class_path: callbacks.ema.EMACallback
              init_args:
                decay: 0.999
                warmup: true
                update_every_n_steps: 1
                start_step: 0
                cpu_offload: false
                eval_with_ema_for: [validate, test]

    Args:
        decay: EMA decay per update, in [0, 1).
        warmup: Ramp the decay up as timm does: ``min(decay, 1 - (1 + n / warmup_gamma) ** -warmup_power)``.
        warmup_gamma: Warm-up time scale in updates (> 0).
        warmup_power: Warm-up exponent (> 0).
        update_every_n_steps: Update after every N-th optimizer step.
        start_step: Start updating after this many optimizer steps.
        start_epoch: Start updating in this (zero-based) epoch.
        cpu_offload: Keep the EMA (and the weights backed up during a swap) in CPU memory.
        eval_with_ema_for: Stages that run on the EMA weights: ``validate``, ``test``, ``predict``.
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 0.75,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        start_epoch: int = 0,
        cpu_offload: bool = False,
        eval_with_ema_for: Sequence[EvalStage] = ("validate",),
    ) -> None:
        unknown = sorted(set(eval_with_ema_for) - set(_STAGES))
        if unknown:
            raise ValueError(f"eval_with_ema_for accepts {list(_STAGES)}, got {unknown}")
        self.schedule = EMASchedule(
            decay, warmup, warmup_gamma, warmup_power, update_every_n_steps, start_step, start_epoch
        )
        self.cpu_offload = cpu_offload
        self.eval_with_ema_for = frozenset(eval_with_ema_for)
        self._ema: ExponentialMovingAverage | None = None
        self._sharded_state = False
        self._pending: dict[str, Any] | None = None
        self._last_update_step = 0

    @property
    def num_updates(self) -> int:
        """How many updates the EMA has folded in."""
        return self._ema.num_updates if self._ema is not None else 0

    def tensors_changed_only_by_steps(self) -> list[Tensor]:
        """The EMA tensors, for an asynchronous checkpoint to copy in the background.

        They change only after an optimizer step (the update) or in a swap, and both wait for such a
        copy first (:func:`detector.checkpoint.staging.wait_for_copies`).
        """
        if self._ema is None:
            return []
        return [t for t in self._ema.state_dict(sharded=True).values() if not isinstance(t, DTensor)]

    def averaged_state_dict(self) -> dict[str, Tensor]:
        """The EMA weights keyed like ``pl_module.state_dict()`` (float32; collective under FSDP2).

        Before the first update the EMA equals the training weights, so they are returned.
        """
        if self._ema is None:
            raise RuntimeError("EMACallback has no EMA yet: ask after fit has started or a checkpoint loaded")
        if self._ema.num_updates == 0 and not self._ema.swapped:
            self._ema.reset()
        return self._ema.state_dict()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            raise ValueError(
                f"EMACallback does not support {type(trainer.strategy).__name__} (flat parameter shards):"
                " use strategy='ddp' or ModelParallelStrategy (FSDP2)"
            )
        # A sharded checkpoint stores each rank's EMA shards as they are; otherwise they are gathered.
        self._sharded_state = bool(getattr(trainer.strategy, "saves_sharded", False))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_ema(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step <= self._last_update_step or not self.schedule.should_update(step, trainer.current_epoch):
            return
        ema = self._ensure_ema(pl_module)
        wait_for_copies()  # an asynchronous checkpoint may still be copying the averages
        ema.update(self.schedule.decay_at(ema.num_updates))
        self._last_update_step = step

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in_for("validate", pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in_for("test", pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in_for("predict", pl_module)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._swap_out()

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._ema is None or not self._ema.swapped:
            return
        # Saved mid-validation: the module holds the EMA, but the checkpoint must hold the raw weights.
        self._ema.swap_out()
        state = trainer.strategy.lightning_module_state_dict()
        # Clone: for DDP the state holds views of the parameters, which swap_in is about to overwrite.
        checkpoint["state_dict"] = {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}
        self._ema.swap_in()

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "settings": self._settings(),
            "num_updates": self.num_updates,
            "last_update_step": self._last_update_step,
        }
        if self._ema is not None:
            state["ema"] = self._ema.state_dict(sharded=self._sharded_state)
        elif self._pending is not None:
            state["ema"] = self._pending["ema"]
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        settings = state_dict.get("settings", {})
        saved = {k: v.item() if isinstance(v, Tensor) else v for k, v in settings.items()}
        if saved and saved != self._settings():
            rank_zero_warn(f"EMACallback settings {self._settings()} differ from the checkpoint's {saved}")
        self._last_update_step = int(state_dict["last_update_step"])
        self._pending = {"ema": state_dict.get("ema"), "num_updates": int(state_dict["num_updates"])}
        if self._ema is not None:
            self._apply_pending(self._ema, self._pending)

    def _settings(self) -> dict[str, Any]:
        return {**asdict(self.schedule), "cpu_offload": self.cpu_offload}

    def _ensure_ema(self, pl_module: pl.LightningModule) -> ExponentialMovingAverage:
        # Built lazily: the module must be on its device and sharded; a loaded state waits for it.
        if self._ema is None:
            device = torch.device("cpu") if self.cpu_offload else None
            self._ema = ExponentialMovingAverage(pl_module, device=device)
        if self._pending is not None:
            self._apply_pending(self._ema, self._pending)
        return self._ema

    def _apply_pending(self, ema: ExponentialMovingAverage, pending: dict[str, Any]) -> None:
        if pending["ema"] is not None:
            ema.load_state_dict(pending["ema"])
        ema.num_updates = pending["num_updates"]
        self._pending = None

    def _swap_in_for(self, stage: str, pl_module: pl.LightningModule) -> None:
        if stage not in self.eval_with_ema_for:
            return
        if self._ema is None and self._pending is None:
            return
        ema = self._ensure_ema(pl_module)
        if ema.num_updates > 0 and not ema.swapped:
            wait_for_copies()  # the swap writes the weights an asynchronous checkpoint may be copying
            ema.swap_in()

    def _swap_out(self) -> None:
        if self._ema is not None and self._ema.swapped:
            wait_for_copies()
            self._ema.swap_out()
