"""Two-process EMACallback runs on CPU (gloo) for tests/test_ema_callback.py: ``ddp`` or ``fsdp2``."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
from test_ema_callback import Tiny, _loader, _trainer

from callbacks.ema import EMACallback


class ShardedTiny(Tiny):
    def configure_model(self) -> None:
        fully_shard(self.layer, mesh=self.device_mesh["data_parallel"])


def ddp(out: Path) -> None:
    ema = EMACallback(decay=0.8, warmup=True)
    trainer = _trainer([ema], max_epochs=2, devices=2, strategy="ddp")
    trainer.fit(Tiny(), _loader())
    trainer.save_checkpoint(out / "last.ckpt")
    torch.save(ema.averaged_state_dict(), out / f"ema_rank{trainer.global_rank}.pt")


def _fsdp2_fit(max_epochs: int, ckpt_path: Path | None = None) -> tuple[EMACallback, pl.Trainer]:
    ema = EMACallback(decay=0.8, warmup=True, update_every_n_steps=3)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = _trainer([ema], max_epochs=max_epochs, devices=2, strategy=strategy)
    trainer.fit(ShardedTiny(), _loader(), _loader(), ckpt_path=ckpt_path)
    return ema, trainer


def fsdp2(out: Path) -> None:
    straight, trainer = _fsdp2_fit(max_epochs=4)
    _, first = _fsdp2_fit(max_epochs=2)
    first.save_checkpoint(out / "sharded")
    resumed, _ = _fsdp2_fit(max_epochs=4, ckpt_path=out / "sharded")
    rank = trainer.global_rank
    state: dict[str, object] = {"num_updates": [straight.num_updates, resumed.num_updates]}
    state |= {"straight": straight.averaged_state_dict(), "resumed": resumed.averaged_state_dict()}
    torch.save(state, out / f"fsdp2_rank{rank}.pt")


if __name__ == "__main__":
    {"ddp": ddp, "fsdp2": fsdp2}[sys.argv[1]](Path(sys.argv[2]))
