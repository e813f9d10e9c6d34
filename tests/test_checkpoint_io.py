"""Tests for the Lightning integration: a real Trainer saves, resumes and evaluates through safetensors."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from detector.checkpoint.format import (
    CheckpointFormatError,
    load_state,
    save_state,
    snapshot_state,
    verify_state,
)
from detector.checkpoint.plugin import SafetensorsCheckpointIO, SafetensorsLoadingMixin
from detector.checkpoint.rng import capture_rng_state
from tests.state_helpers import assert_identical


class TinyModule(SafetensorsLoadingMixin, pl.LightningModule):
    def __init__(self, hidden: int = 4, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(hidden, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = nn.functional.cross_entropy(self.layer(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self.layer(batch[0]), batch[1]))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0])

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class PlainModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(24, 4, generator=generator), torch.randint(0, 2, (24,), generator=generator)
    )
    return DataLoader(data, batch_size=4)


def _trainer(**kwargs: Any) -> pl.Trainer:
    defaults = {"enable_checkpointing": False, "logger": False, "enable_progress_bar": False}
    return pl.Trainer(
        plugins=[SafetensorsCheckpointIO()],
        accelerator="cpu",
        enable_model_summary=False,
        **{**defaults, **kwargs},
    )


def _trained(tmp_path: Path, **kwargs: Any) -> tuple[pl.Trainer, TinyModule, Path]:
    pl.seed_everything(0)
    model, trainer = TinyModule(), _trainer(max_epochs=1, **kwargs)
    trainer.fit(model, _loader())
    path = tmp_path / "x.safetensors"
    trainer.save_checkpoint(path)
    return trainer, model, path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[pl.Trainer, TinyModule, Path]:
    """One epoch of training, saved by ``trainer.save_checkpoint``; shared, so tests must not modify it."""
    return _trained(tmp_path_factory.mktemp("trained"))


class _RecordAtTrainStart(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # snapshot: state_dict()s share memory with the live tensors that training then updates
        self.seen = snapshot_state(
            {
                "global_step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "loops": trainer.fit_loop.state_dict(),
                "state_dict": pl_module.state_dict(),
                "optimizer": trainer.optimizers[0].state_dict(),
                "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            }
        )


def _forbid_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle was used")

    for target in ("torch.load", "pickle.load", "pickle.loads", "pickle.Unpickler"):
        monkeypatch.setattr(target, refuse)


def test_real_lightning_checkpoint_dict_round_trips_exactly(tmp_path: Path) -> None:
    callbacks = [
        ModelCheckpoint(dirpath=tmp_path / "mc", monitor="train_loss"),
        EMAWeightAveraging(decay=0.9),
    ]
    trainer, _, _ = _trained(tmp_path, callbacks=callbacks, enable_checkpointing=True)
    checkpoint = trainer._checkpoint_connector.dump_checkpoint()
    checkpoint["rng"] = capture_rng_state()  # NumPy arrays and tuples, as the top-K callback adds them
    assert any("EMAWeightAveraging" in key for key in checkpoint["callbacks"])
    SafetensorsCheckpointIO().save_checkpoint(checkpoint, tmp_path / "dump.safetensors")
    assert_identical(load_state(tmp_path / "dump.safetensors"), checkpoint)


def test_trainer_save_checkpoint_writes_a_verified_file_of_the_trainer_state(trained: tuple) -> None:
    trainer, _, path = trained
    verify_state(path)
    saved = load_state(path)
    assert (saved["epoch"], saved["global_step"]) == (1, 6)
    assert list(saved["optimizer_states"][0]["state"]) == [0, 1]
    assert_identical(saved["lr_schedulers"][0], trainer.lr_scheduler_configs[0].scheduler.state_dict())
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.safetensors"]


def test_fit_resumes_loops_optimizer_and_scheduler_without_pickle(
    trained: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, path = trained
    saved = load_state(path)
    _forbid_pickle(monkeypatch)
    recorder = _RecordAtTrainStart()
    _trainer(max_epochs=2, callbacks=[recorder]).fit(TinyModule(), _loader(), ckpt_path=path)
    assert (recorder.seen["global_step"], recorder.seen["epoch"]) == (6, 1)
    assert recorder.seen["loops"]["epoch_progress"]["total"]["completed"] == 1
    assert_identical(recorder.seen["state_dict"], saved["state_dict"])
    assert_identical(recorder.seen["optimizer"], saved["optimizer_states"][0])
    assert_identical(recorder.seen["scheduler"], saved["lr_schedulers"][0])


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(trained: tuple) -> None:
    _, _, path = trained
    pl.seed_everything(0)
    straight = TinyModule()
    _trainer(max_epochs=2).fit(straight, _loader())
    resumed = TinyModule()
    _trainer(max_epochs=2).fit(resumed, _loader(), ckpt_path=path)
    assert_identical(resumed.state_dict(), straight.state_dict())


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluation_stages_load_a_safetensors_ckpt_path(trained: tuple, stage: str) -> None:
    _, model, path = trained
    fresh = TinyModule()
    getattr(_trainer(), stage)(fresh, _loader(), ckpt_path=path)
    assert_identical(fresh.state_dict(), model.state_dict())


def test_load_from_checkpoint_builds_the_module_without_pickle(
    trained: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, model, path = trained
    _forbid_pickle(monkeypatch)
    loaded = TinyModule.load_from_checkpoint(path)
    assert isinstance(loaded, TinyModule) and dict(loaded.hparams) == {"hidden": 4, "lr": 0.05}
    assert_identical(loaded.state_dict(), model.state_dict())
    assert TinyModule.load_from_checkpoint(path, lr=0.5).hparams.lr == 0.5
    with pytest.raises(ValueError, match="does not support hparams_file"):
        TinyModule.load_from_checkpoint(path, hparams_file="h.yaml")


def test_lightning_own_load_from_checkpoint_would_unpickle(trained: tuple) -> None:
    """Pins why the mixin exists: Lightning 2.6 reads ``load_from_checkpoint`` files with torch.load."""
    _, _, path = trained
    with pytest.raises(pickle.UnpicklingError):
        PlainModule.load_from_checkpoint(path)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_pickled_ckpt_is_refused_by_fit_and_load_from_checkpoint(tmp_path: Path) -> None:
    path, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, path)
    with pytest.raises(CheckpointFormatError, match="a pickle file"):
        _trainer(max_epochs=1).fit(TinyModule(), _loader(), ckpt_path=path)
    with pytest.raises(CheckpointFormatError, match="a pickle file"):
        TinyModule.load_from_checkpoint(path)
    assert not marker.exists()


def test_files_that_hold_no_lightning_checkpoint_are_refused(tmp_path: Path) -> None:
    save_state([1, 2], tmp_path / "list.safetensors")
    save_state({"epoch": 1}, tmp_path / "no_weights.safetensors")
    with pytest.raises(
        CheckpointFormatError, match=r"list.safetensors: holds a list, not a Lightning checkpoint"
    ):
        SafetensorsCheckpointIO().load_checkpoint(tmp_path / "list.safetensors")
    with pytest.raises(
        CheckpointFormatError, match=r"no_weights.safetensors: holds no 'state_dict'; keys: \['epoch'\]"
    ):
        TinyModule.load_from_checkpoint(tmp_path / "no_weights.safetensors")


def test_remove_checkpoint_deletes_the_file_and_tolerates_a_missing_one(tmp_path: Path) -> None:
    io, path = SafetensorsCheckpointIO(), tmp_path / "sub" / "a.safetensors"
    io.save_checkpoint({"epoch": 1}, path)
    assert io.load_checkpoint(path) == {"epoch": 1}
    io.remove_checkpoint(path)
    io.remove_checkpoint(path)
    assert list(path.parent.iterdir()) == []


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    io = SafetensorsCheckpointIO()
    with pytest.raises(TypeError, match="takes storage_options for URLs only"):
        io.save_checkpoint({}, tmp_path / "a.safetensors", storage_options={"x": 1})
    io.save_checkpoint({}, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="takes a device as map_location"):
        io.load_checkpoint(tmp_path / "a.safetensors", map_location={"cuda:1": "cuda:0"})


def _mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def test_a_resume_load_keeps_nothing_mapped_so_a_rotated_file_is_freed(tmp_path: Path) -> None:
    # Resume (fit(ckpt_path=...)) reads through the plugin: every tensor in its own memory, the file
    # closed. A mapped load would leave AdamW's moments as views of the file for the rest of training
    # (Optimizer.load_state_dict keeps CPU tensors of the right dtype as they are), pinning the blocks
    # of a `latest` that rotation has since replaced.
    path = tmp_path / "checkpoint_latest.safetensors"
    save_state(
        {"state_dict": {"w": torch.ones(1 << 16)}, "optimizer_states": [{"m": torch.ones(1 << 16)}]}, path
    )
    checkpoint = SafetensorsCheckpointIO().load_checkpoint(path)
    assert torch.equal(checkpoint["optimizer_states"][0]["m"], torch.ones(1 << 16)) and not _mapped(path)
    mapped = load_state(path, mmap=True)
    assert _mapped(path)  # what the mapped load would have kept
    del mapped
