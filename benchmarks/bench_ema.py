"""Training step time with the EMA on vs off, on the default model and a DeBERTa-v3-base-sized one.

A plain loop (forward, backward, AdamW step, then the EMA update when on) on random token batches.
Steps with and without the update alternate on the same model, in adjacent pairs whose order flips
each time (a shared, noisy machine drifts less within a pair); the report gives the median over pairs
of (step time on) / (step time off), the median step times, and the EMA update timed alone.

    PYTHONPATH=. python benchmarks/bench_ema.py --sizes small base --batch 4 --seq 128 --pairs 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import DebertaV2ForSequenceClassification, PreTrainedModel

from detector.backbone import architecture_config, build_classifier
from detector.ema import EMASchedule, ExponentialMovingAverage

BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


def build(size: str) -> PreTrainedModel:
    if size == "small":
        return build_classifier(None, 8000)
    return DebertaV2ForSequenceClassification(architecture_config(128100, **BASE))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: torch.device, clock: str) -> float:
    now = time.process_time if clock == "cpu" else time.perf_counter
    sync(device)
    start = now()
    fn()
    sync(device)
    return now() - start


def bench(size: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = build(size).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    ema = ExponentialMovingAverage(model, device="cpu" if args.cpu_offload else None)
    schedule = EMASchedule(decay=0.999, warmup=True)
    ids = torch.randint(5, model.config.vocab_size, (args.batch, args.seq), device=device)
    labels = torch.randint(0, 2, (args.batch,), device=device)

    def update() -> None:
        ema.update(schedule.decay_at(ema.num_updates))

    def train_step(with_ema: bool) -> None:
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if with_ema:
            update()

    train_step(True)  # warm-up: allocate optimizer state and grads
    times: dict[bool, list[float]] = {True: [], False: []}
    for pair in range(args.pairs):
        for with_ema in (True, False) if pair % 2 == 0 else (False, True):
            times[with_ema].append(timed(lambda w=with_ema: train_step(w), device, args.clock))
    alone = statistics.median(timed(update, device, args.clock) for _ in range(args.pairs))
    off = statistics.median(times[False])
    return {
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_off_s": off,
        "step_on_s": statistics.median(times[True]),
        "median_pair_ratio": statistics.median(a / b for a, b in zip(times[True], times[False], strict=True)),
        "update_alone_s": alone,
        "update_over_step_off": alone / off,
    }


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--sizes", nargs="+", default=["small", "base"], choices=["small", "base"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=10, help="adjacent on/off step pairs, order alternating")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"], help="cpu: this process's CPU time (shared CPUs)"
    )
    parser.add_argument("--cpu-offload", action="store_true", help="keep the EMA in CPU memory")
    args = parser.parse_args()
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    print(f"device={device} threads={threads} clock={args.clock} batch={args.batch}x{args.seq}", flush=True)
    for size in args.sizes:
        result = bench(size, args, device)
        print(size, " ".join(f"{k}={v:.4g}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()
