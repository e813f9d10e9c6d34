"""Scoring throughput of a bundle on the CPU: PyTorch eager vs ONNX Runtime, texts per second.

Both backends score the same real texts through ``detector.bundle.loading.load_detector`` in one
process, alternating which goes first in each repeat; the report gives each repeat, the medians
and the median of the per-repeat ratios (ONNX / PyTorch).

Without ``--bundle`` it writes a throwaway bundle (with ``model.onnx``) to a temp folder: a tokenizer
trained on the texts and a randomly initialised classifier of ``--arch`` (``small``: the project's
SMALL_ARCH; ``base``: DeBERTa-v3-base's shape). Throughput does not depend on the weights' values.

    python benchmarks/bench_scoring.py --arch small --n-texts 512 --repeats 5
    python benchmarks/bench_scoring.py --bundle outputs/models/inference/model_v1.0_final
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

import onnxruntime
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detector.backbone import build_classifier  # noqa: E402
from detector.bundle.loading import Detector, load_detector  # noqa: E402
from detector.bundle.writer import write_bundle  # noqa: E402
from detector.tokenizer import train_tokenizer  # noqa: E402

DATA = REPO / "../shared/data/fdgpt_family/val.jsonl"
BASE_ARCH = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
}
ARCHS = {"small": {}, "base": BASE_ARCH}


def read_texts(path: Path, n: int) -> list[str]:
    with path.open(encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    return texts[:n]


def throwaway_bundle(root: Path, texts: list[str], arch: str, max_length: int) -> Path:
    tokenizer = train_tokenizer(texts, 8000)
    torch.manual_seed(0)
    model = build_classifier(None, len(tokenizer), arch=ARCHS[arch]).eval()
    metadata = {
        "version": "0.0", "epoch": 0, "step": 0, "metrics": {}, "checkpoint": None, "seed": 0,
        "config": {"arch": arch}, "data_fingerprint": None, "weights": "trained", "max_length": max_length,
        "decision_threshold": 0.5, "target_fpr": 0.01, "threshold_source": "benchmark",
    }  # fmt: skip
    return write_bundle(model, tokenizer, root, f"bench_{arch}", metadata, onnx=True)


def texts_per_second(detector: Detector, texts: list[str], batch_size: int) -> float:
    start = time.perf_counter()
    detector.score(texts, batch_size=batch_size)
    return len(texts) / (time.perf_counter() - start)


def run(bundle: Path, texts: list[str], batch_size: int, repeats: int) -> dict[str, list[float]]:
    detectors = {"torch": load_detector(bundle, "torch"), "onnx": load_detector(bundle, "onnx")}
    for detector in detectors.values():  # warm-up: allocator, ORT graph caches
        detector.score(texts[: 2 * batch_size], batch_size=batch_size)
    rates: dict[str, list[float]] = {"torch": [], "onnx": []}
    for r in range(repeats):
        order = ["torch", "onnx"] if r % 2 == 0 else ["onnx", "torch"]
        for backend in order:
            rates[backend].append(texts_per_second(detectors[backend], texts, batch_size))
        print(
            f"repeat {r}: torch {rates['torch'][-1]:8.1f}  onnx {rates['onnx'][-1]:8.1f} texts/s", flush=True
        )
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="an existing bundle with model.onnx")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="small")
    parser.add_argument("--n-texts", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    texts = read_texts(args.data, args.n_texts)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or throwaway_bundle(Path(tmp), texts, args.arch, args.max_length)
        print(
            f"bundle {bundle.name} | {len(texts)} texts from {args.data.name} | batch {args.batch_size} | "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads) | "
            f"onnxruntime {onnxruntime.__version__} | {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
        )
        rates = run(bundle, texts, args.batch_size, args.repeats)
    ratios = [o / t for o, t in zip(rates["onnx"], rates["torch"], strict=True)]
    torch_rate, onnx_rate = statistics.median(rates["torch"]), statistics.median(rates["onnx"])
    print(
        f"median texts/s: torch {torch_rate:.1f}, onnx {onnx_rate:.1f}; median ratio onnx/torch "
        f"{statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})"
    )


if __name__ == "__main__":
    main()
