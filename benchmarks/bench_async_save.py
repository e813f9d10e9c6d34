"""How long a checkpoint save blocks the training loop, sync vs async, on the DeBERTa classifier + AdamW.

Trains the classifier on random tokens with ``SafetensorsTopKCheckpoint(every_n_train_steps=k)``, once
with ``async_save=False`` and once with ``True``, and once with Lightning's ``ModelCheckpoint`` (torch.save
files, same cadence), timing every save call the training loop makes (for async: waiting for the previous
write, the state dump and the copy of the small parts of the state) plus every wait of the loop at the
fence (before the next optimizer step, for the background copy of the weights and moments), added to the
save it waited for, and the whole fit. Also times, on the final state, one ``save_state`` (the sync
write) and one ``snapshot_state`` (a first full snapshot).

    PYTHONPATH=. python benchmarks/bench_async_save.py                  # small: build_classifier(None, 8000)
    PYTHONPATH=. python benchmarks/bench_async_save.py --size base --steps 6 --save-every 2 --rounds 5
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from callbacks.safetensors_checkpoint import SafetensorsTopKCheckpoint
from detector.backbone import build_classifier
from detector.checkpoint.format import save_state, snapshot_state
from detector.checkpoint.plugin import SafetensorsCheckpointIO

# DeBERTa-v3-base: 184M parameters; with AdamW's two moments the state is about 2.2 GB.
BASE_ARCH = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
}
SIZES: dict[str, tuple[int, dict[str, Any]]] = {"small": (8000, {}), "base": (128100, BASE_ARCH)}


class Classifier(pl.LightningModule):
    def __init__(self, size: str) -> None:
        super().__init__()
        vocab, arch = SIZES[size]
        self.model = build_classifier(None, vocab, arch=arch)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class TimedCheckpoint(SafetensorsTopKCheckpoint):
    """Records how long each save holds the training loop (fence waits too), and the waits for a write."""

    blocked: list[float]
    waited: list[float]
    fenced: list[float]

    def _fence(self) -> None:
        start = time.perf_counter()
        super()._fence()
        waited = time.perf_counter() - start
        self.fenced.append(waited)
        if self.blocked:  # the loop waits for the copy of the last save: part of what that save cost it
            self.blocked[-1] += waited

    def _write(self, *args: Any, **kwargs: Any) -> None:
        wait = self._jobs.wait

        def timed_wait() -> None:
            start = time.perf_counter()
            wait()
            self.waited.append(time.perf_counter() - start)

        self._jobs.wait = timed_wait  # type: ignore[method-assign]
        start = time.perf_counter()
        try:
            super()._write(*args, **kwargs)
        finally:
            self._jobs.wait = wait  # type: ignore[method-assign]
        self.blocked.append(time.perf_counter() - start)


class TimedModelCheckpoint(ModelCheckpoint):
    """Lightning's own checkpoint callback, recording how long each save holds the training loop."""

    blocked: list[float]
    waited: list[float]
    fenced: list[float]

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        start = time.perf_counter()
        super()._save_checkpoint(trainer, filepath)
        self.blocked.append(time.perf_counter() - start)


def run(size: str, mode: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    vocab = SIZES[size][0]
    ids = torch.randint(5, vocab, (args.steps * args.batch_size, args.seq_len))
    labels = torch.randint(0, 2, (args.steps * args.batch_size,))
    loader = DataLoader(TensorDataset(ids, labels), batch_size=args.batch_size)
    callback: TimedCheckpoint | TimedModelCheckpoint
    if mode == "lightning":
        callback = TimedModelCheckpoint(str(folder), every_n_train_steps=args.save_every, save_top_k=1)
    else:
        callback = TimedCheckpoint(
            str(folder), every_n_epochs=0, every_n_train_steps=args.save_every, async_save=mode == "async"
        )
    callback.blocked, callback.waited, callback.fenced = [], [], []
    module = Classifier(size)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        plugins=[] if mode == "lightning" else [SafetensorsCheckpointIO()],
        callbacks=[callback],
    )
    start = time.perf_counter()
    trainer.fit(module, loader)
    fit_s = time.perf_counter() - start
    fenced = sum(callback.fenced)
    return {
        "blocked": callback.blocked,
        "waited": callback.waited,
        "fenced": fenced,
        "fit_s": fit_s,
        "trainer": trainer,
    }


def standalone(trainer: pl.Trainer, folder: Path) -> tuple[float, float, int]:
    """Seconds for one ``save_state`` and one ``snapshot_state`` of the final full state, and its bytes."""
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    start = time.perf_counter()
    snapshot = snapshot_state(checkpoint)
    snapshot_s = time.perf_counter() - start
    del snapshot
    path = folder / "standalone.safetensors"
    start = time.perf_counter()
    save_state(checkpoint, path)
    save_s = time.perf_counter() - start
    return save_s, snapshot_s, path.stat().st_size


def current_rss_gib() -> float:
    """This process's resident memory now (from /proc), in GiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="interleaved sync/async pairs (the order alternates); the fit ratio is the median of the pairs'",
    )
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temp checkpoint folder")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for index in range(args.rounds):
            order = ("sync", "async") if index % 2 == 0 else ("async", "sync")
            rounds.append({mode: run(args.size, mode, args, Path(tmp) / f"{mode}{index}") for mode in order})
            pair = rounds[-1]
            for earlier in rounds[:-1]:  # a trainer holds its model, optimizer and staging buffers
                for result in earlier.values():
                    result.pop("trainer", None)
            gc.collect()  # a trainer is a web of cycles: its tensors go only when the cycle collector runs
            print(
                f"round {index}: fit sync {pair['sync']['fit_s']:.2f} s, async {pair['async']['fit_s']:.2f} s"
                f" ({pair['async']['fit_s'] / pair['sync']['fit_s']:.2f}x);"
                f" current RSS {current_rss_gib():.1f} GiB",
                flush=True,
            )
        lightning = run(args.size, "lightning", args, Path(tmp) / "lightning")
        save_s, snapshot_s, size = standalone(rounds[-1]["async"]["trainer"], Path(tmp))
    print(f"size={args.size} state={size / 2**20:.1f} MiB steps={args.steps} save_every={args.save_every}")
    print(f"standalone: save_state {save_s:.3f} s, snapshot_state {snapshot_s:.3f} s")
    for mode, result in (*rounds[-1].items(), ("lightning", lightning)):
        blocked = result["blocked"]
        print(
            f"{mode:5s}: saves={len(blocked)} blocked median={statistics.median(blocked):.3f} s"
            f" max={max(blocked):.3f} s total={sum(blocked):.2f} s"
            f" (waiting for the previous write {sum(result['waited']):.2f} s, at the fence"
            f" {result['fenced']:.2f} s); fit {result['fit_s']:.2f} s"
        )
    blocked = [
        statistics.median(pair["async"]["blocked"]) / statistics.median(pair["sync"]["blocked"])
        for pair in rounds
    ]
    fits = [pair["async"]["fit_s"] / pair["sync"]["fit_s"] for pair in rounds]
    print(
        f"async/sync over {len(rounds)} interleaved rounds (median [min, max]): loop blocked per save"
        f" {statistics.median(blocked):.2f}x [{min(blocked):.2f}, {max(blocked):.2f}] (target <= 0.15);"
        f" fit wall {statistics.median(fits):.2f}x [{min(fits):.2f}, {max(fits):.2f}] (target <= 1.00)"
    )
    sync_blocked = statistics.median(b for pair in rounds for b in pair["sync"]["blocked"])
    ratio = sync_blocked / statistics.median(lightning["blocked"])
    print(f"sync/Lightning ModelCheckpoint: loop blocked per save {ratio:.2f}x")


if __name__ == "__main__":
    main()
