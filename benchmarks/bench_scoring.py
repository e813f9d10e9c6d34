"""Scoring on the CPU: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8, speed, size and quality.

The three backends of ``detector.bundle.loading.load_detector`` (``torch``, ``onnx``, ``onnx-int8``)
score the same real texts in one process, at each batch size, rotating which goes first in each
repeat; the report gives each repeat, the medians and the median of the per-repeat ratios to eager
PyTorch, the size of each backend's file, and, the texts being labelled, each backend's AUROC on
them and the share of texts whose decision differs from PyTorch's (each backend at its own stored
threshold: the int8 one at ``int8.decision_threshold``).

Without ``--bundle`` it writes a throwaway bundle (with ``model.onnx`` and ``model_int8.onnx``) to a
temp folder: a tokenizer trained on the texts and a randomly initialised classifier of ``--arch``
(``small``: the project's SMALL_ARCH; ``base``: DeBERTa-v3-base's shape). Throughput does not depend
on the weights' values; its AUROC does (a random model's means nothing, and its int8 check is run
with limits of 1): for quality, pass a trained bundle exported with ``--quantize``.

    python benchmarks/bench_scoring.py --arch base --n-texts 64 --batch-sizes 1 32 --repeats 3
    python benchmarks/bench_scoring.py --bundle outputs/models/inference/model_v1.0_final --n-texts 1120
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from torchmetrics.functional.classification import binary_auroc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detector.backbone import build_classifier  # noqa: E402
from detector.bundle.loading import BACKENDS, WEIGHTS_FILE, Detector, load_detector  # noqa: E402
from detector.bundle.onnx import ONNX_FILE  # noqa: E402
from detector.bundle.quantize import INT8_FILE, Int8Check  # noqa: E402
from detector.bundle.writer import read_metadata, write_bundle  # noqa: E402
from detector.tokenizer import train_tokenizer  # noqa: E402

DATA = REPO / "../shared/data/fdgpt_family/val.jsonl"
BASE_ARCH = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
}
ARCHS = {"small": {}, "base": BASE_ARCH}
FILES = {"torch": WEIGHTS_FILE, "onnx": ONNX_FILE, "onnx-int8": INT8_FILE}


def read_rows(path: Path, n: int) -> tuple[list[str], list[int]]:
    """The first ``n`` texts of a JSONL file and their labels."""
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][:n]
    return [row["text"] for row in rows], [int(row["label"]) for row in rows]


def throwaway_bundle(root: Path, texts: list[str], labels: list[int], arch: str, max_length: int) -> Path:
    tokenizer = train_tokenizer(texts, 8000)
    torch.manual_seed(0)
    model = build_classifier(None, len(tokenizer), arch=ARCHS[arch]).eval()
    metadata = {
        "version": "0.0", "epoch": 0, "step": 0, "metrics": {}, "checkpoint": None, "seed": 0,
        "config": {"arch": arch}, "data_fingerprint": None, "weights": "trained", "max_length": max_length,
        "decision_threshold": 0.5, "target_fpr": 0.01, "threshold_source": "benchmark",
    }  # fmt: skip
    check = Int8Check(texts, labels, max_auroc_drop=1.0, max_decision_change=1.0)  # speed only
    return write_bundle(model, tokenizer, root, f"bench_{arch}", metadata, int8=check)


def timed(detector: Detector, texts: list[str], batch_size: int) -> tuple[float, list[dict[str, Any]]]:
    start = time.perf_counter()
    results = detector.score(texts, batch_size=batch_size)
    return len(texts) / (time.perf_counter() - start), results


def run(
    bundle: Path, texts: list[str], batch_sizes: list[int], repeats: int
) -> tuple[dict[int, dict[str, list[float]]], dict[str, list[dict[str, Any]]]]:
    """Texts/s per batch size and backend, and each backend's results at the last batch size."""
    detectors = {backend: load_detector(bundle, backend) for backend in BACKENDS}
    rates: dict[int, dict[str, list[float]]] = {}
    results: dict[str, list[dict[str, Any]]] = {}
    for batch_size in batch_sizes:
        for detector in detectors.values():  # warm-up: allocator, ORT graph caches
            detector.score(texts[: 2 * batch_size], batch_size=batch_size)
        rates[batch_size] = {backend: [] for backend in BACKENDS}
        for r in range(repeats):
            order = BACKENDS[r % 3 :] + BACKENDS[: r % 3]
            for backend in order:
                rate, results[backend] = timed(detectors[backend], texts, batch_size)
                rates[batch_size][backend].append(rate)
            line = "  ".join(f"{b} {rates[batch_size][b][-1]:7.2f}" for b in BACKENDS)
            print(f"batch {batch_size:3d} repeat {r}: {line} texts/s", flush=True)
    return rates, results


def speed_table(rates: dict[int, dict[str, list[float]]]) -> str:
    lines = [
        "| batch | torch texts/s | onnx texts/s | onnx-int8 texts/s | onnx / torch | int8 / torch (range) |",
        "|---|---|---|---|---|---|",
    ]
    for batch_size, by_backend in rates.items():
        medians = {b: statistics.median(v) for b, v in by_backend.items()}
        ratio = {
            b: [x / t for x, t in zip(by_backend[b], by_backend["torch"], strict=True)]
            for b in ("onnx", "onnx-int8")
        }
        int8 = ratio["onnx-int8"]
        lines.append(
            f"| {batch_size} | {medians['torch']:.2f} | {medians['onnx']:.2f} | {medians['onnx-int8']:.2f} | "
            f"{statistics.median(ratio['onnx']):.2f} | {statistics.median(int8):.2f} "
            f"({min(int8):.2f}-{max(int8):.2f}) |"
        )
    return "\n".join(lines)


def quality_table(bundle: Path, results: dict[str, list[dict[str, Any]]], labels: list[int]) -> str:
    truth = torch.tensor(labels)
    reference = np.array([row["is_machine"] for row in results["torch"]])
    metadata = read_metadata(bundle)
    thresholds = {"torch": metadata["decision_threshold"], "onnx": metadata["decision_threshold"]}
    thresholds["onnx-int8"] = (metadata.get("int8") or {}).get("decision_threshold")
    lines = [
        "| backend | file | MB | AUROC | threshold | decisions changed vs torch |",
        "|---|---|---|---|---|---|",
    ]
    for backend, rows in results.items():
        probs = torch.tensor([row["prob_machine"] for row in rows], dtype=torch.float64)
        auroc = float(binary_auroc(probs, truth)) if len(set(labels)) == 2 else float("nan")
        changed = float((np.array([row["is_machine"] for row in rows]) != reference).mean())
        size = (bundle / FILES[backend]).stat().st_size / 1e6
        lines.append(
            f"| {backend} | `{FILES[backend]}` | {size:.1f} | {auroc:.4f} | {thresholds[backend]:.6g} | "
            f"{changed:.2%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="an existing bundle exported with --quantize")
    parser.add_argument("--data", type=Path, default=DATA, help="labelled JSONL (text, label)")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="small")
    parser.add_argument("--n-texts", type=int, default=512)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--max-length", type=int, default=512, help="throwaway bundle only")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    texts, labels = read_rows(args.data, args.n_texts)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or throwaway_bundle(Path(tmp), texts, labels, args.arch, args.max_length)
        print(
            f"bundle {bundle.name} | {len(texts)} texts from {args.data.name} | batches {args.batch_sizes} | "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads) | "
            f"onnxruntime {onnxruntime.__version__} | {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
        )
        rates, results = run(bundle, texts, args.batch_sizes, args.repeats)
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f}\n\n{speed_table(rates)}\n")
        print(quality_table(bundle, results, labels))
        check = read_metadata(bundle).get("int8") or {}
        print(
            f"\nexport-time int8 check ({check.get('checked_on')}): AUROC drop {check.get('auroc_drop')}, "
            f"decisions changed {check.get('decision_change')}"
        )


if __name__ == "__main__":
    main()
