"""The int8 model with and without ONNX Runtime's fused operators, side by side in one process.

For a bundle exported with ``--quantize`` (its ``model_int8.onnx`` is fused), the unfused int8 model
is rebuilt from the bundle's ``model.onnx`` as ``export`` builds it before the fusion: the outlier
channels calibrated on the same 64 validation texts, the same MatMuls kept fp32, ``quantize_onnx``.
Both run the same batches (``score``'s padding and batch size 32, tokenized once, outside the timing),
alternating which goes first, for ``--repeats`` rounds; the table gives medians and the ratio's range.
Also the largest logit difference between the two and each one's operator counts.

    python benchmarks/bench_int8_fusion.py BUNDLE --val-data ../shared/data/fdgpt_family/val.jsonl \\
        --n-texts 320 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_scoring import read_rows  # noqa: E402

from detector.bundle.onnx import ONNX_FILE  # noqa: E402
from detector.bundle.quantize import (  # noqa: E402
    INT8_FILE,
    Int8Check,
    matmul_input_maxima,
    quantize_onnx,
    score_feeds,
)
from detector.bundle.writer import read_metadata  # noqa: E402


def main() -> None:
    import onnx
    import onnxruntime as ort
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="a bundle exported with --quantize")
    parser.add_argument("--val-data", type=Path, required=True, help="the labelled file it was exported with")
    parser.add_argument("--n-texts", type=int, default=320, help="texts timed, the first of --val-data")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    metadata = read_metadata(args.bundle)
    max_length, entry = metadata["max_length"], metadata["int8"]
    tokenizer = AutoTokenizer.from_pretrained(args.bundle)
    texts, labels = read_rows(args.val_data, sys.maxsize)
    sample = Int8Check(texts, labels).sample_texts()
    timed = texts[: args.n_texts]
    feeds = score_feeds(tokenizer, timed, max_length)
    with tempfile.TemporaryDirectory(prefix="bench-int8-fusion-") as tmp:
        unfused = Path(tmp) / "unfused.onnx"
        maxima = matmul_input_maxima(args.bundle / ONNX_FILE, score_feeds(tokenizer, sample, max_length))
        quantize_onnx(args.bundle / ONNX_FILE, unfused, keep_fp32=list(entry["fp32_matmuls"]), maxima=maxima)
        paths = {"unfused": unfused, "fused": args.bundle / INT8_FILE}
        for name, path in paths.items():
            ops = Counter(node.op_type for node in onnx.load(path).graph.node)
            print(
                f"{name}: {sum(ops.values())} nodes, " + ", ".join(f"{k} {v}" for k, v in ops.most_common(8))
            )
        sessions = {
            name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for name, path in paths.items()
        }
    logits = {name: [s.run(["logits"], f)[0] for f in feeds] for name, s in sessions.items()}  # also warms up
    diff = max(float(np.abs(a - b).max()) for a, b in zip(logits["unfused"], logits["fused"], strict=True))
    rates: dict[str, list[float]] = {name: [] for name in sessions}
    for repeat in range(args.repeats):
        for name in sorted(sessions, reverse=repeat % 2 == 1):
            start = time.perf_counter()
            for feed in feeds:
                sessions[name].run(["logits"], feed)
            rates[name].append(len(timed) / (time.perf_counter() - start))
        print(f"repeat {repeat}: " + "  ".join(f"{n} {rates[n][-1]:7.2f}" for n in sessions) + " texts/s")
    ratios = [f / u for f, u in zip(rates["fused"], rates["unfused"], strict=True)]
    print(f"\nmax abs logit difference fused vs unfused: {diff:.4g}")
    print("\n| texts | batch | unfused int8 texts/s | fused int8 texts/s | fused / unfused (median, range) |")
    print("|---|---|---|---|---|")
    print(
        f"| {len(timed)} | 32 | {statistics.median(rates['unfused']):.2f} | "
        f"{statistics.median(rates['fused']):.2f} | {statistics.median(ratios):.2f} "
        f"({min(ratios):.2f}-{max(ratios):.2f}) |"
    )


if __name__ == "__main__":
    main()
