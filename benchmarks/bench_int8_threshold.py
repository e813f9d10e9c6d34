"""The int8 threshold rules side by side: how many decisions each changes against the float model.

For a bundle exported with ``--quantize``, both models score the validation texts (where every
threshold is chosen) and, optionally, texts no threshold saw. Three int8 thresholds are compared
with the float model at its own: the float threshold itself, the lowest meeting the float
threshold's target FPR on the int8 scores (``threshold_at_fpr``, the rule before session 7), and the
one of those closest to the float decisions (``threshold_at_fpr_closest_to``, what ``export`` records).

    python benchmarks/bench_int8_threshold.py BUNDLE --val-data ../shared/data/fdgpt_family/val.jsonl \\
        --unseen ../shared/data/fdgpt_family/revised_val.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_scoring import read_rows  # noqa: E402

from detector.bundle.loading import load_detector  # noqa: E402
from detector.bundle.thresholds import (  # noqa: E402
    rates_at_threshold,
    threshold_at_fpr,
    threshold_at_fpr_closest_to,
)
from detector.bundle.writer import read_metadata  # noqa: E402


def probs(bundle: Path, backend: str, texts: list[str]) -> np.ndarray:
    detector = load_detector(bundle, backend=backend)
    return np.array([row["prob_machine"] for row in detector.score(texts, batch_size=32)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="a bundle exported with --quantize")
    parser.add_argument("--val-data", type=Path, required=True, help="the labelled file it was exported with")
    parser.add_argument("--unseen", type=Path, help="labelled texts no threshold was chosen on")
    args = parser.parse_args()
    metadata = read_metadata(args.bundle)
    target = metadata["target_fpr"]
    sets = {"val": read_rows(args.val_data, sys.maxsize)}
    if args.unseen:
        sets["unseen"] = read_rows(args.unseen, sys.maxsize)
    scored = {
        name: (probs(args.bundle, "torch", t), probs(args.bundle, "onnx-int8", t))
        for name, (t, _) in sets.items()
    }
    float_val, int8_val = scored["val"]
    labels_val = np.array(sets["val"][1])
    float_threshold = metadata["decision_threshold"]
    thresholds = {
        "the float threshold": float_threshold,
        "lowest meeting the target": threshold_at_fpr(int8_val, labels_val, target),
        "closest meeting the target": threshold_at_fpr_closest_to(
            int8_val, labels_val, float_val > float_threshold, target
        ),
    }
    print(f"{args.bundle.name}: float threshold {float_threshold:.6f}, target_fpr {target}; "
          f"recorded int8 threshold {metadata['int8']['decision_threshold']:.6f}")  # fmt: skip
    print("| int8 threshold | value | set | texts | decisions changed | int8 FPR | int8 TPR |")
    print("|---|---|---|---|---|---|---|")
    for rule, threshold in thresholds.items():
        for name, (float_probs, int8_probs) in scored.items():
            labels = np.array(sets[name][1])
            changed = (float_probs > float_threshold) != (int8_probs > threshold)
            fpr, tpr = rates_at_threshold(int8_probs, labels, threshold)
            print(f"| {rule} | {threshold:.6f} | {name} | {labels.size} | {changed.mean():.2%} "
                  f"({int(changed.sum())}) | {fpr:.4f} | {tpr:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
