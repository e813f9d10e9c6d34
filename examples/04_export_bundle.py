"""Export an inference bundle from a checkpoint after the fact, with a threshold chosen on validation data.

Run from the repository root: ``python examples/04_export_bundle.py`` (trains with ``01_train.py``
first if its checkpoints are missing). The same on the command line::

    python -m detector export outputs/checkpoints/checkpoint_best_val_f1.safetensors \\
        --version 1.1 --val-data my/val.jsonl --onnx
"""

from __future__ import annotations

import json
import shutil

from common import WORK, demo_data, ensure_trained

from detector.commands import export as export_cmd

OUT = WORK / "export"
NAME = "model_v1.1_best"


def main() -> None:
    best = ensure_trained() / "checkpoint_best_val_f1.safetensors"
    shutil.rmtree(OUT / NAME, ignore_errors=True)  # bundles are never overwritten: clear this example's own
    args = [
        str(best), "--out", str(OUT), "--version", "1.1", "--name", NAME,
        "--val-data", str(demo_data()["val"]), "--target-fpr", "0.05", "--onnx",
    ]  # fmt: skip
    code = export_cmd.main(args)
    if code:
        raise SystemExit(code)
    bundle = OUT / NAME
    print("files:", sorted(p.name for p in bundle.iterdir()))
    metadata = json.loads((bundle / "training_metadata.json").read_text())
    for key in (
        "version",
        "epoch",
        "step",
        "weights",
        "decision_threshold",
        "threshold_source",
        "checkpoint",
    ):
        print(f"  {key}: {metadata[key]}")


if __name__ == "__main__":
    main()
