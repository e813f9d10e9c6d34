"""Use the checkpoint components in another Lightning project: any LightningModule, no detector model.

Run from the repository root: ``python examples/06_callback_in_another_project.py``. Three pieces:

- ``SafetensorsCheckpointIO``: the Trainer writes and reads checkpoints as checksummed safetensors.
- ``SafetensorsTopKCheckpoint``: latest, best, top-K and periodic files of the full training state.
- ``EMACallback``: validation on an exponential moving average of the weights, kept in the checkpoint.

The module below is a plain regression model on random data; it logs ``val_loss``, which the
checkpoint callback ranks with ``mode="min"``.
"""

from __future__ import annotations

import shutil

import lightning.pytorch as pl
import torch
from common import WORK
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.ema import EMACallback
from callbacks.safetensors_checkpoint import SafetensorsTopKCheckpoint
from detector.checkpoint.format import load_state
from detector.checkpoint.plugin import SafetensorsCheckpointIO, load_module_from_checkpoint

RUN = WORK / "another_project"


class Regressor(pl.LightningModule):
    def __init__(self, width: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(width, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x).squeeze(-1), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def loader(seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=generator)
    y = x @ torch.linspace(-1, 1, 8) + 0.1 * torch.randn(256, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=32)


def trainer(max_epochs: int) -> pl.Trainer:
    checkpoint = SafetensorsTopKCheckpoint(
        dirpath=str(RUN / "checkpoints"), monitor="val_loss", mode="min", save_top_k=2, every_n_train_steps=10
    )
    return pl.Trainer(
        max_epochs=max_epochs,
        plugins=[SafetensorsCheckpointIO()],  # every save and every ckpt_path load: safetensors, no pickle
        callbacks=[EMACallback(decay=0.9), checkpoint],
        default_root_dir=str(RUN),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def main() -> None:
    shutil.rmtree(RUN, ignore_errors=True)
    pl.seed_everything(0)
    first = trainer(max_epochs=2)
    first.fit(Regressor(), loader(0), loader(1))
    folder = RUN / "checkpoints"
    print("files:", sorted(p.name for p in folder.iterdir()))

    # Resume: Lightning reads the file through the CheckpointIO and restores model, optimizer,
    # loops, EMA and the top-K tracker; the run continues at step 16.
    second = trainer(max_epochs=4)
    second.fit(Regressor(), loader(0), loader(1), ckpt_path=str(folder / "checkpoint_latest.safetensors"))
    print(
        f"resumed run ended at step {second.global_step}; best: {second.checkpoint_callback.best_model_path}"
    )

    # Weights without a Trainer and without pickle: the raw weights as a module, the EMA from the state.
    best = folder / "checkpoint_best_val_loss.safetensors"
    model = load_module_from_checkpoint(Regressor, best)
    ema = next(s for k, s in load_state(best)["callbacks"].items() if k.startswith("EMACallback"))
    print(f"best: {type(model).__name__} (width {model.hparams.width}); EMA of {len(ema['ema'])} tensors")


if __name__ == "__main__":
    main()
