"""GPU check: bf16-mixed training of a DeBERTa-v3-base-sized detector on one GPU (random init, no hub).

Trains ``DetectorModule`` through a Lightning Trainer on random token batches for ``--steps`` steps and
reports samples per second, model FLOPs utilisation (MFU), peak GPU memory, and the time to save and
to load the full training state (weights, AdamW state, loops, callbacks) as one safetensors checkpoint
through ``SafetensorsCheckpointIO``. Without a CUDA device it says so and exits with status 0.

    PYTHONPATH=. python benchmarks/gpu_check.py --steps 300 --batch 16 --seq 512
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import DebertaV2Config

from detector.backbone import architecture_config
from detector.checkpoint.format import load_state
from detector.checkpoint.plugin import SafetensorsCheckpointIO
from detector.module import DetectorModule

BASE_ARCH: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "position_buckets": 256,
}
BASE_VOCAB = 128100
# Dense bf16 tensor-core peaks (no sparsity), by a name fragment of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def model_flops_per_sample(config: DebertaV2Config, seq: int) -> float:
    """Matmul FLOPs of one training step on one sequence of ``seq`` tokens (backward = 2x forward).

    Per layer: Q, K, V, output projections and the FFN (``2 s (4 h^2 + 2 h i)``), content attention
    scores and weighted values (``2 * 2 s^2 h``), and DeBERTa's disentangled terms: the relative
    position embeddings (``2k`` of them, ``k = position_buckets``) through the shared key and query
    projections (``2 * 2 (2k) h^2``) and the c2p and p2c scores against them (``2 * 2 s (2k) h``).
    Embedding lookups, LayerNorm, softmax and the 2-way head are left out.
    """
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    span = 2 * (config.position_buckets if config.position_buckets > 0 else config.max_position_embeddings)
    per_layer = 2 * seq * (4 * h * h + 2 * h * i) + 4 * seq * seq * h + 4 * span * h * h + 4 * seq * span * h
    return 3.0 * layers * per_layer


class RandomTokens(Dataset):
    """Random token sequences of one length, full attention mask, random 0/1 labels."""

    def __init__(self, count: int, seq: int, vocab_size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(5, vocab_size, (count, seq), generator=generator)
        self.labels = torch.randint(0, 2, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[index]}


class StepClock(pl.Callback):
    """Wall time from the end of step ``warmup`` to the end of the last step, GPU synchronised."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0
        self.first_step: int | None = None
        self.last_step = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step < self.warmup:
            return
        torch.cuda.synchronize()
        now = time.perf_counter()
        if self.first_step is None:
            self.start, self.first_step = now, trainer.global_step
        self.end, self.last_step = now, trainer.global_step

    @property
    def timed_steps(self) -> int:
        return self.last_step - (self.first_step or 0)


def peak_tflops(name: str, override: float | None) -> float | None:
    """The device's dense bf16 peak in TFLOP/s: ``override``, else looked up by name, else ``None``."""
    if override is not None:
        return override
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def time_checkpoint(trainer: pl.Trainer, folder: Path) -> dict[str, float]:
    """Seconds to save and to load (every tensor touched) the full state; the file's size in GB."""
    path = folder / "checkpoint.safetensors"
    start = time.perf_counter()
    trainer.save_checkpoint(path)
    saved = time.perf_counter() - start
    start = time.perf_counter()
    load_state(path)  # copies every tensor into memory and verifies the checksum
    loaded = time.perf_counter() - start
    return {"save_s": saved, "load_s": loaded, "size_gb": path.stat().st_size / 1e9}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, time, checkpoint; returns the figures."""
    pl.seed_everything(0)
    config = architecture_config(BASE_VOCAB, **BASE_ARCH)
    module = DetectorModule(arch=BASE_ARCH, vocab_size=BASE_VOCAB, learning_rate=2e-5)
    data = RandomTokens(args.batch * args.steps, args.seq, BASE_VOCAB)
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, num_workers=2, pin_memory=True)
    clock = StepClock(args.warmup)
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        plugins=[SafetensorsCheckpointIO()], callbacks=[clock], limit_val_batches=0,
    )  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, loader)
    samples_per_s = clock.timed_steps * args.batch / (clock.end - clock.start)
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name, args.peak_tflops)
    achieved = samples_per_s * model_flops_per_sample(config, args.seq) / 1e12
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        checkpoint = time_checkpoint(trainer, Path(folder))
    return {
        "device": name,
        "parameters": sum(p.numel() for p in module.parameters()),
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "timed_steps": clock.timed_steps,
        "samples_per_s": samples_per_s,
        "model_tflops_per_s": achieved,
        "mfu": achieved / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
        "checkpoint": checkpoint,
    }  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps in all")
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the timing")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--tmp", help="folder for the checkpoint timing (default: the system temp folder)")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the check; status 0 (with a message) when there is no CUDA device."""
    args = _parser().parse_args(argv)
    if args.warmup >= args.steps:
        raise ValueError(f"--warmup must be < --steps, got {args.warmup} >= {args.steps}")
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; nothing measured. Run it on a machine with a GPU.")
        return 0
    figures = run(args)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
